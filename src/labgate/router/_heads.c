/*
 * labgate.router._heads: one-pass scanners for the commonest request and
 * response heads, so that a kept-alive exchange of small messages skips
 * httptools' per-header callbacks (see docs/router.md, "Heads read in one
 * pass").
 *
 * Both functions accept only a strict subset of HTTP/1.1 and answer None for
 * anything else: an incomplete head, a body that is not all there, a byte or
 * header the subset leaves out. The caller then feeds the same bytes to
 * httptools (llhttp, strict), which decides as it always did. So these
 * scanners never refuse anything and never accept anything llhttp would
 * refuse: every byte they let through is one llhttp reads the same way.
 *
 * Built by scripts/compile-router.py next to the mypyc modules; without it
 * the router runs httptools alone.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* Limits of labgate.router.http (MAX_HEAD, MAX_HEADERS, MAX_TARGET). */
#define MAX_HEAD 65536
#define MAX_HEADERS 128
#define MAX_TARGET 8192

static unsigned char TCHAR[256];  /* header name characters (RFC 9110 token) */
static unsigned char VCHAR[256];  /* header value characters: HTAB, SP, VCHAR */
static unsigned char PCHAR[256];  /* request target characters (RFC 3986 path and query) */
static unsigned char LOWER[256];

static void
init_tables(void)
{
    const char *extra_t = "!#$%&'*+-.^_`|~";
    const char *extra_p = "-._~!$&'()*+,;=:@/?%";
    for (int c = 0; c < 256; c++) {
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        TCHAR[c] = alnum || (c && strchr(extra_t, c) != NULL);
        PCHAR[c] = alnum || (c && strchr(extra_p, c) != NULL);
        VCHAR[c] = c == '\t' || (c >= 0x20 && c <= 0x7e);
        LOWER[c] = (unsigned char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
    }
}

/* Whether p[0:n] equals the lower-case name, ignoring case. */
static int
name_is(const unsigned char *p, Py_ssize_t n, const char *name)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        if (name[i] == '\0' || LOWER[p[i]] != (unsigned char)name[i])
            return 0;
    }
    return name[i] == '\0';
}

/* name_is for the current header line's name (name, len), its length compared first. */
#define NAME_IS(lower) (len == (Py_ssize_t)sizeof(lower) - 1 && name_is(name, len, lower))

static int
starts_with(const unsigned char *p, Py_ssize_t n, const char *prefix)
{
    Py_ssize_t len = (Py_ssize_t)strlen(prefix);
    return n >= len && name_is(p, len, prefix);
}

/* One header line at p[i:]: name, value without the whitespace before it, end of line. */
typedef struct {
    Py_ssize_t name, name_len, value, value_len, end;
} line_t;

/*
 * Where the header value starting at i ends: the first byte from i on that is
 * no VCHAR (n when there is none). Sixteen bytes at a time where SSE2 is there
 * (every x86-64): a byte below 0x20 (signed: 0x80 and above too) or 0x7f stops
 * the fast loop, and one byte is then judged by the table (a tab goes on).
 */
static Py_ssize_t
value_end(const unsigned char *p, Py_ssize_t n, Py_ssize_t i)
{
#ifdef __SSE2__
    const __m128i space = _mm_set1_epi8(0x20), del = _mm_set1_epi8(0x7f);
    for (;;) {
        while (i + 16 <= n) {
            __m128i v = _mm_loadu_si128((const __m128i *)(p + i));
            __m128i bad = _mm_or_si128(_mm_cmplt_epi8(v, space), _mm_cmpeq_epi8(v, del));
            int mask = _mm_movemask_epi8(bad);
            if (mask != 0) {
                i += __builtin_ctz((unsigned)mask);
                break;
            }
            i += 16;
        }
        if (i >= n || !VCHAR[p[i]])
            return i;
        i++;
        if (i + 16 > n)
            break;
    }
#endif
    while (i < n && VCHAR[p[i]])
        i++;
    return i;
}

/*
 * Read the header line starting at i. Returns 1 with *line filled, 0 at the
 * head's empty last line (*line.end set past it), -1 when the line is not in
 * the subset or not complete.
 */
static int
header_line(const unsigned char *p, Py_ssize_t n, Py_ssize_t i, line_t *line)
{
    if (i + 1 >= n)
        return -1;
    if (p[i] == '\r') {
        if (p[i + 1] != '\n')
            return -1;
        line->end = i + 2;
        return 0;
    }
    line->name = i;
    while (i < n && TCHAR[p[i]])
        i++;
    line->name_len = i - line->name;
    if (line->name_len == 0 || i >= n || p[i] != ':')
        return -1;
    i++;
    while (i < n && (p[i] == ' ' || p[i] == '\t'))
        i++;
    line->value = i;
    i = value_end(p, n, i);
    if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n')
        return -1;
    /* Whitespace before the line's end stays part of the value: llhttp keeps it too. */
    line->value_len = i - line->value;
    line->end = i + 2;
    return 1;
}

static int
value_is(const unsigned char *p, const line_t *line, const char *value)
{
    return name_is(p + line->value, line->value_len, value);
}

static int
contains(const unsigned char *p, Py_ssize_t n, const char *needle)
{
    Py_ssize_t len = (Py_ssize_t)strlen(needle);
    for (Py_ssize_t i = 0; i + len <= n; i++) {
        if (memcmp(p + i, needle, (size_t)len) == 0)
            return 1;
    }
    return 0;
}

PyDoc_STRVAR(scan_response_doc,
"scan_response(data) -> (head_end, cut_start, cut_end) | None\n\n"
"A complete ``HTTP/1.1`` response with a final status other than 204 and 304,\n"
"one ``Content-Length`` and exactly that many body bytes after the head, and no\n"
"hop-by-hop or ``Set-Cookie`` header but one ``Connection: keep-alive``: where\n"
"the head ends, and the span of that ``Connection`` line (0, 0 without one),\n"
"the only bytes a client must not get. None for anything else.");

static PyObject *
scan_response(PyObject *module, PyObject *arg)
{
    if (!PyBytes_CheckExact(arg))
        Py_RETURN_NONE;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    if (n < 19 || memcmp(p, "HTTP/1.1 ", 9) != 0)
        Py_RETURN_NONE;
    for (int k = 9; k < 12; k++) {
        if (p[k] < '0' || p[k] > '9')
            Py_RETURN_NONE;
    }
    int status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    if (status < 200 || status > 599 || status == 204 || status == 304 || p[12] != ' ')
        Py_RETURN_NONE;
    Py_ssize_t i = 13;
    while (i < n && p[i] != '\r') {
        if (!VCHAR[p[i]])
            Py_RETURN_NONE;
        i++;
    }
    if (i + 1 >= n || p[i + 1] != '\n')
        Py_RETURN_NONE;
    i += 2;
    long long length = -1;
    Py_ssize_t cut_start = 0, cut_end = 0;
    int count = 0;
    line_t line;
    for (;;) {
        int got = header_line(p, n, i, &line);
        if (got < 0 || line.end > MAX_HEAD)
            Py_RETURN_NONE;
        i = line.end;
        if (got == 0)
            break;
        if (++count > MAX_HEADERS)
            Py_RETURN_NONE;
        const unsigned char *name = p + line.name;
        Py_ssize_t len = line.name_len;
        if (NAME_IS("content-length")) {
            if (length >= 0 || line.value_len < 1 || line.value_len > 18)
                Py_RETURN_NONE;
            length = 0;
            for (Py_ssize_t k = 0; k < line.value_len; k++) {
                unsigned char c = p[line.value + k];
                if (c < '0' || c > '9')
                    Py_RETURN_NONE;
                length = length * 10 + (c - '0');
            }
        }
        else if (NAME_IS("connection")) {
            if (cut_end != 0 || !value_is(p, &line, "keep-alive"))
                Py_RETURN_NONE;
            cut_start = line.name;
            cut_end = line.end;
        }
        else if (NAME_IS("set-cookie") || NAME_IS("keep-alive")
                 || NAME_IS("transfer-encoding") || NAME_IS("te")
                 || NAME_IS("trailer") || NAME_IS("upgrade")
                 || NAME_IS("proxy-connection")
                 || NAME_IS("proxy-authenticate")
                 || NAME_IS("proxy-authorization")) {
            Py_RETURN_NONE;
        }
    }
    if (length < 0 || (long long)(n - i) != length)
        Py_RETURN_NONE;
    PyObject *end = PyLong_FromSsize_t(i);
    PyObject *start = PyLong_FromSsize_t(cut_start);
    PyObject *stop = PyLong_FromSsize_t(cut_end);
    PyObject *result = (end && start && stop) ? PyTuple_Pack(3, end, start, stop) : NULL;
    Py_XDECREF(end);
    Py_XDECREF(start);
    Py_XDECREF(stop);
    return result;
}

PyDoc_STRVAR(scan_request_doc,
"scan_request(data) -> tuple | None\n\n"
"A complete request head at the start of ``data`` without a body: a GET, HEAD,\n"
"POST, PUT, PATCH, DELETE or OPTIONS of an origin-form target, HTTP/1.1 or 1.0,\n"
"one ``Host``, at most one ``Cookie``, ``Authorization``, ``Origin``,\n"
"``Sec-Fetch-Site`` and ``Connection`` (``keep-alive`` or ``close``),\n"
"``Content-Length`` only as 0, and none of the other headers the router\n"
"decides on (``Transfer-Encoding``, ``Expect``, ``Upgrade``, hop-by-hop ones,\n"
"``Forwarded``, ``X-Forwarded-For``...). Returns ``(head_end, method, target,\n"
"http11, connection, host, cookie, authorization, origin, fetch_site,\n"
"browser, content_length_zero, kept)``: ``connection`` 0 (none),\n"
"1 (keep-alive) or 2 (close); ``browser`` whether ``Accept`` names text/html;\n"
"``kept`` the headers to forward as ``Name: value\\r\\n`` lines, in order,\n"
"without ``X-Forwarded-*`` and ``X-Labgate-*``. None for anything else.");

static const char *METHODS[] = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", NULL};
/* The same bytes object for every request of a method: its hash is worked out once. */
static PyObject *METHOD_OBJECTS[sizeof(METHODS) / sizeof(METHODS[0])];

static PyObject *
scan_request(PyObject *module, PyObject *arg)
{
    if (!PyBytes_CheckExact(arg))
        Py_RETURN_NONE;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    Py_ssize_t i = 0;
    while (i < n && i < 8 && p[i] >= 'A' && p[i] <= 'Z')
        i++;
    if (i == 0 || i >= n || p[i] != ' ')
        Py_RETURN_NONE;
    Py_ssize_t method_len = i;
    int known = -1;
    for (int m = 0; METHODS[m] != NULL; m++) {
        if ((Py_ssize_t)strlen(METHODS[m]) == method_len
            && memcmp(p, METHODS[m], (size_t)method_len) == 0) {
            known = m;
            break;
        }
    }
    if (known < 0)
        Py_RETURN_NONE;
    Py_ssize_t target = ++i;
    if (i >= n || p[i] != '/')
        Py_RETURN_NONE;
    while (i < n && PCHAR[p[i]])
        i++;
    Py_ssize_t target_len = i - target;
    /* The space, then "HTTP/1.x\r\n": 11 bytes. */
    if (target_len > MAX_TARGET || i + 11 > n || p[i] != ' ')
        Py_RETURN_NONE;
    i++;
    int http11;
    if (memcmp(p + i, "HTTP/1.1\r\n", 10) == 0)
        http11 = 1;
    else if (memcmp(p + i, "HTTP/1.0\r\n", 10) == 0)
        http11 = 0;
    else
        Py_RETURN_NONE;
    i += 10;

    line_t line, host = {0}, cookie = {0}, authorization = {0}, origin = {0}, fetch_site = {0};
    int hosts = 0, cookies = 0, authorizations = 0, origins = 0, fetch_sites = 0;
    int connection = 0, browser = 0, content_length_zero = 0, count = 0;
    /* Kept lines are copied here as "Name: value\r\n": never longer than the head. */
    Py_ssize_t kept_len = 0;
    unsigned char stack[4096];
    unsigned char *kept = stack;
    Py_ssize_t kept_cap = (Py_ssize_t)sizeof(stack);
    PyObject *result = NULL;
    for (;;) {
        int got = header_line(p, n, i, &line);
        if (got < 0 || line.end > MAX_HEAD)
            goto none;
        i = line.end;
        if (got == 0)
            break;
        if (++count > MAX_HEADERS)
            goto none;
        const unsigned char *name = p + line.name;
        Py_ssize_t len = line.name_len;
        int keep = 1;
        if (NAME_IS("host")) {
            host = line;
            hosts++;
            keep = 0;
        }
        else if (NAME_IS("cookie")) {
            cookie = line;
            cookies++;
            keep = 0;
        }
        else if (NAME_IS("authorization")) {
            authorization = line;
            authorizations++;
            keep = 0;
        }
        else if (NAME_IS("accept")) {
            if (contains(p + line.value, line.value_len, "text/html"))
                browser = 1;
        }
        else if (NAME_IS("origin")) {
            origin = line;
            origins++;
        }
        else if (NAME_IS("sec-fetch-site")) {
            fetch_site = line;
            fetch_sites++;
        }
        else if (NAME_IS("connection")) {
            if (connection != 0)
                goto none;
            if (value_is(p, &line, "keep-alive"))
                connection = 1;
            else if (value_is(p, &line, "close"))
                connection = 2;
            else
                goto none;
            keep = 0;
        }
        else if (NAME_IS("content-length")) {
            if (content_length_zero || line.value_len != 1 || p[line.value] != '0')
                goto none;
            content_length_zero = 1;
            keep = 0;
        }
        else if (NAME_IS("x-forwarded-for")) {
            goto none;  /* believed from a trusted proxy: the router decides, in Python */
        }
        else if (starts_with(name, len, "x-forwarded-") || starts_with(name, len, "x-labgate-")) {
            keep = 0;  /* the router's own: never forwarded as the client sent them */
        }
        else if (NAME_IS("transfer-encoding") || NAME_IS("expect")
                 || NAME_IS("upgrade") || NAME_IS("keep-alive")
                 || NAME_IS("proxy-connection") || NAME_IS("te")
                 || NAME_IS("trailer") || NAME_IS("proxy-authorization")
                 || NAME_IS("forwarded") || NAME_IS("x-real-ip")
                 || NAME_IS("close")) {
            goto none;
        }
        if (!keep)
            continue;
        Py_ssize_t need = len + 2 + line.value_len + 2;
        if (kept_len + need > kept_cap) {
            Py_ssize_t cap = kept_cap * 2 > kept_len + need ? kept_cap * 2 : kept_len + need;
            unsigned char *grown = PyMem_Malloc((size_t)cap);
            if (grown == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(grown, kept, (size_t)kept_len);
            if (kept != stack)
                PyMem_Free(kept);
            kept = grown;
            kept_cap = cap;
        }
        memcpy(kept + kept_len, name, (size_t)len);
        kept_len += len;
        kept[kept_len++] = ':';
        kept[kept_len++] = ' ';
        memcpy(kept + kept_len, p + line.value, (size_t)line.value_len);
        kept_len += line.value_len;
        kept[kept_len++] = '\r';
        kept[kept_len++] = '\n';
    }
    if (hosts != 1 || cookies > 1 || authorizations > 1 || origins > 1 || fetch_sites > 1)
        goto none;

#define SPAN(l, seen) \
    ((seen) ? PyBytes_FromStringAndSize((const char *)p + (l).value, (l).value_len) \
            : Py_NewRef(Py_None))
    PyObject *items[13] = {
        PyLong_FromSsize_t(i),
        Py_NewRef(METHOD_OBJECTS[known]),
        PyBytes_FromStringAndSize((const char *)p + target, target_len),
        PyBool_FromLong(http11),
        PyLong_FromLong(connection),
        SPAN(host, 1),
        SPAN(cookie, cookies),
        SPAN(authorization, authorizations),
        SPAN(origin, origins),
        SPAN(fetch_site, fetch_sites),
        PyBool_FromLong(browser),
        PyBool_FromLong(content_length_zero),
        PyBytes_FromStringAndSize((const char *)kept, kept_len),
    };
#undef SPAN
    result = PyTuple_New(13);
    for (int k = 0; k < 13; k++) {
        if (items[k] == NULL || result == NULL) {
            Py_CLEAR(result);
            for (int j = 0; j < 13; j++)
                Py_XDECREF(items[j]);
            goto done;
        }
    }
    for (int k = 0; k < 13; k++)
        PyTuple_SET_ITEM(result, k, items[k]);
    goto done;
none:
    result = Py_NewRef(Py_None);
done:
    if (kept != stack)
        PyMem_Free(kept);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_request", scan_request, METH_O, scan_request_doc},
    {"scan_response", scan_response, METH_O, scan_response_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "labgate.router._heads",
    "One-pass scanners for common HTTP/1.1 heads (a strict subset; None means: ask httptools).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__heads(void)
{
    init_tables();
    for (int m = 0; METHODS[m] != NULL; m++) {
        METHOD_OBJECTS[m] = PyBytes_FromString(METHODS[m]);
        if (METHOD_OBJECTS[m] == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
