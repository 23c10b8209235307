package org.loraplex.plugin;

import java.io.IOException;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;

/** /tenants/... on TorchServe's management API (behind its management token): operator onboarding. */
@Endpoint(urlPattern = "tenants", endpointType = EndpointTypes.MANAGEMENT,
          description = "loraplex tenant onboarding (forwarded to tenant_registry/http_api.py)")
public class TenantsEndpoint extends ModelServerEndpoint {
    @Override public void doGet(Request req, Response rsp, Context ctx) throws IOException { Forwarder.forward("GET", req, rsp); }
    @Override public void doPost(Request req, Response rsp, Context ctx) throws IOException { Forwarder.forward("POST", req, rsp); }
    @Override public void doPut(Request req, Response rsp, Context ctx) throws IOException { Forwarder.forward("PUT", req, rsp); }
    @Override public void doDelete(Request req, Response rsp, Context ctx) throws IOException { Forwarder.forward("DELETE", req, rsp); }
}
