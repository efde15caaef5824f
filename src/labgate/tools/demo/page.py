"""The demo tool's page: who it serves, and a WebSocket echo from the browser."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>labgate demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto">
<h1>labgate demo</h1>
<p>Instance <code id="instance">{instance}</code> of <strong id="user">{user}</strong>.</p>
<p>WebSocket echo: <output id="echo">waiting</output></p>
<script>
const base = {base_json};
const scheme = location.protocol === "https:" ? "wss://" : "ws://";
const ws = new WebSocket(scheme + location.host + base + "ws");
ws.onopen = () => ws.send("hello from the browser");
ws.onmessage = (event) => {{ document.getElementById("echo").textContent = event.data; }};
ws.onerror = () => {{ document.getElementById("echo").textContent = "WebSocket failed"; }};
</script>
</body></html>
"""
