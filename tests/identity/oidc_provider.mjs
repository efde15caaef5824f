// The OpenID Connect provider of the identity tests: npm's certified `oidc-provider`,
// with one client for labgate and a few accounts. Started by tests/identity/conftest.py:
//   node oidc_provider.mjs PORT REDIRECT_URI [REDIRECT_URI...]
// prints "listening <issuer>" once it serves. Its own sign-in page (devInteractions)
// accepts any password; the account is the name typed in.
import Provider from 'oidc-provider';

const [port, ...redirectUris] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;

// Accounts, by subject: the subject is deliberately not the user name, as with real
// providers; on the sign-in page, type the subject (a-1f3e for alice).
const ACCOUNTS = {
  'a-1f3e': { sub: 'a-1f3e', preferred_username: 'alice', email: 'alice@uni.example', groups: ['physics', 'staff'] },
  'b-77c0': { sub: 'b-77c0', preferred_username: 'bob', email: 'bob@elsewhere.example', groups: [] },
  'c-9d21': { sub: 'c-9d21', preferred_username: 'carol', email: 'carol@uni.example', groups: ['labgate-admins'] },
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'labgate',
    client_secret: 'labgate-test-secret',
    redirect_uris: redirectUris,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  pkce: { required: () => true },
  claims: { openid: ['sub'], profile: ['preferred_username', 'name'], email: ['email'], groups: ['groups'] },
  scopes: ['openid', 'profile', 'email', 'groups'],
  conformIdTokenClaims: false,
  cookies: { keys: ['labgate-test-cookie-key'] },
  // A first-party client: the grant is given without a consent page.
  async loadExistingGrant(ctx) {
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid profile email groups');
    grant.addOIDCClaims(['preferred_username', 'email', 'groups', 'name']);
    await grant.save();
    return grant;
  },
  async findAccount(ctx, id) {
    const account = ACCOUNTS[id];
    if (!account) return undefined;
    return {
      accountId: account.sub,
      async claims() { return { ...account, name: account.preferred_username }; },
    };
  },
});
provider.proxy = false;
provider.listen(Number(port), '127.0.0.1', () => { console.log(`listening ${issuer}`); });
