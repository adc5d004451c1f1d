// sandboxd's proxy agent for node runs with network ([network] proxy).
//
// Node 18 and 20 ignore HTTP_PROXY/HTTPS_PROXY: their http, https and fetch
// dial the destination themselves, and the run's network reaches nothing but
// the proxy. The bootstrap calls install() before user code runs when the
// worker's environment names an http:// proxy:
// - http: requests go to the proxy with the absolute URL as their target;
// - https: a CONNECT tunnel through the proxy, then TLS to the destination;
// - fetch: a small fetch over those two (no redirects are followed: the answer
//   is the first response, as with redirect: 'manual'; bodies are buffered).
// Agents a run passes itself, net.connect and SOCKS proxies are not handled:
// such connections fail, since only the proxy is reachable.
'use strict';

const http = require('http');
const https = require('https');
const tls = require('tls');

function install(proxyUrl) {
  const proxy = new URL(proxyUrl);
  if (proxy.protocol !== 'http:') return;
  const proxyHost = proxy.hostname;
  const proxyPort = Number(proxy.port) || 3128;

  class HttpProxyAgent extends http.Agent {
    addRequest(request, options) {
      const port = options.port || 80;
      request.path = `http://${options.host}${port === 80 ? '' : `:${port}`}${request.path}`;
      super.addRequest(request, { ...options, host: proxyHost, port: proxyPort });
    }
  }

  class HttpsProxyAgent extends https.Agent {
    createConnection(options, callback) {
      const target = `${options.host}:${options.port || 443}`;
      const connect = http.request({
        host: proxyHost, port: proxyPort, method: 'CONNECT', path: target,
        headers: { host: target }, agent: false,
      });
      connect.once('connect', (response, socket) => {
        if (response.statusCode !== 200) {
          socket.destroy();
          callback(new Error(`the proxy refused CONNECT ${target}: ${response.statusCode}`));
          return;
        }
        callback(null, tls.connect({ ...options, socket, servername: options.servername || options.host }));
      });
      connect.once('error', callback);
      connect.end();
    }
  }

  http.globalAgent = new HttpProxyAgent({ keepAlive: true });
  https.globalAgent = new HttpsProxyAgent({ keepAlive: true });

  globalThis.fetch = async function fetch(input, init) {
    const request = new Request(input, init);
    const url = new URL(request.url);
    const body = request.body === null ? undefined : Buffer.from(await request.arrayBuffer());
    const client = url.protocol === 'https:' ? https : http;
    return new Promise((resolve, reject) => {
      const outgoing = client.request(url, {
        method: request.method, headers: Object.fromEntries(request.headers),
      }, (response) => {
        const chunks = [];
        response.on('data', (chunk) => chunks.push(chunk));
        response.on('error', reject);
        response.on('end', () => {
          const headers = new Headers();
          for (const [name, value] of Object.entries(response.headers)) {
            for (const item of [].concat(value)) headers.append(name, item);
          }
          const empty = [101, 204, 205, 304].includes(response.statusCode);
          resolve(new Response(empty ? null : Buffer.concat(chunks), {
            status: response.statusCode, statusText: response.statusMessage, headers,
          }));
        });
      });
      outgoing.on('error', (error) => reject(new TypeError('fetch failed', { cause: error })));
      request.signal.addEventListener('abort', () => outgoing.destroy(new Error('aborted')));
      outgoing.end(body);
    });
  };
}

module.exports = { install };
