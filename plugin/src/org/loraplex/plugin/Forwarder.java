package org.loraplex.plugin;

import io.netty.handler.codec.http.FullHttpRequest;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.lang.reflect.Field;
import java.net.HttpURLConnection;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;
import org.pytorch.serve.util.ConfigManager;

/**
 * Forwards one plugin request to loraplex's onboarding service (tenant_registry/http_api.py) on
 * loopback and copies its answer back: method, path + query, body and the few headers the service
 * reads. The service does all the work and checks the tokens itself; nothing is decided here.
 *
 * Where the service listens: config.properties key {@code loraplex_onboarding_url}
 * (default http://127.0.0.1:8083). Called on TorchServe's task pool, one thread per request.
 *
 * Headers: TorchServe 0.12's plugin Request interface gives header names but no values, so the
 * values are read from the Netty request the SDK object wraps (its private field {@code req}).
 *
 * Bodies: TorchServe 0.12's HttpRequestHandler (a SimpleChannelInboundHandler, which releases the
 * request when its read returns) submits custom endpoints to a thread pool, so by the time this code
 * runs the body's buffer is freed (reading it throws IllegalReferenceCountException: refCnt 0, or
 * would read a reused buffer). A request with a body is therefore refused here with 501; uploads go
 * to the onboarding service directly (README "Onboarding over HTTP").
 */
final class Forwarder {
    static final String URL_KEY = "loraplex_onboarding_url";
    static final String DEFAULT_URL = "http://127.0.0.1:8083";
    static final String[] FORWARDED = {"Authorization", "Content-Type", "X-Tenant-ID", "X-Tenant-Key"};
    static final int TIMEOUT_MS = 120_000;

    private Forwarder() {}

    static void forward(String method, Request req, Response rsp) throws IOException {
        String base = ConfigManager.getInstance().getProperty(URL_KEY, DEFAULT_URL);
        FullHttpRequest netty = nettyRequest(req);
        if (netty == null) {
            error(rsp, 500, "the onboarding plugin cannot read this TorchServe's request headers");
            return;
        }
        HttpURLConnection c;
        try {
            c = (HttpURLConnection) URI.create(base.replaceAll("/+$", "") + netty.uri()).toURL().openConnection();
        } catch (IllegalArgumentException e) {
            error(rsp, 400, "malformed request path");
            return;
        }
        c.setRequestMethod(method);
        c.setConnectTimeout(5_000);
        c.setReadTimeout(TIMEOUT_MS);
        c.setInstanceFollowRedirects(false);
        c.setRequestProperty("X-Forwarded-By", "torchserve-plugin");
        for (String h : FORWARDED) {
            java.util.List<String> values = netty.headers().getAll(h);
            if (values.size() > 1) {
                error(rsp, 400, h + " sent more than once");
                return;
            }
            if (values.size() == 1) {
                c.setRequestProperty(h, values.get(0));
            }
        }
        // The body is never read: TorchServe 0.12 releases it before this endpoint runs (see above).
        String length = netty.headers().get("Content-Length");
        if (netty.headers().contains("Transfer-Encoding") || (length != null && !length.trim().equals("0"))) {
            error(rsp, 501, "TorchServe 0.12 drops request bodies before a plugin endpoint runs, so uploads cannot "
                    + "pass through port 8081: upload to the onboarding service (onboarding_address) with the same "
                    + "token, or name a server directory with ?path=");
            return;
        }
        try {
            if (method.equals("POST") || method.equals("PUT")) {
                c.setDoOutput(true);
                c.setFixedLengthStreamingMode(0);
                c.getOutputStream().close();
            }
            int status = c.getResponseCode();
            InputStream in = status >= 400 ? c.getErrorStream() : c.getInputStream();
            byte[] answer = in == null ? new byte[0] : readAll(in);
            rsp.setStatus(status);
            String type = c.getContentType();
            rsp.setContentType(type == null ? "application/json" : type);
            rsp.getOutputStream().write(answer);
        } catch (IOException e) {
            error(rsp, 503, "the loraplex onboarding service is not reachable (is tenant_registry.http_api running?)");
        } finally {
            c.disconnect();
        }
    }

    static FullHttpRequest nettyRequest(Request req) {
        for (Class<?> k = req.getClass(); k != null; k = k.getSuperclass()) {
            try {
                Field f = k.getDeclaredField("req");
                f.setAccessible(true);
                Object v = f.get(req);
                return v instanceof FullHttpRequest ? (FullHttpRequest) v : null;
            } catch (NoSuchFieldException e) {
                // look in the superclass
            } catch (ReflectiveOperationException | RuntimeException e) {
                return null;
            }
        }
        return null;
    }

    static byte[] readAll(InputStream in) throws IOException {
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        byte[] chunk = new byte[1 << 16];
        for (int n; (n = in.read(chunk)) > 0; ) {
            buf.write(chunk, 0, n);
        }
        return buf.toByteArray();
    }

    static void error(Response rsp, int status, String message) throws IOException {
        rsp.setStatus(status);
        rsp.setContentType("application/json");
        String json = "{\"error\": {\"type\": \"PluginError\", \"message\": \"" + message + "\", \"status\": " + status + "}}";
        rsp.getOutputStream().write(json.getBytes(StandardCharsets.UTF_8));
    }
}
