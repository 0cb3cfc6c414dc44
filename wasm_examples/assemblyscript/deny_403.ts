// Denies a request with a local 403 when it carries `x-deny: true`.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  send_local_response, GrpcStatusValues, HeaderPair, Headers, log, LogLevelValues,
} from "@solo-io/proxy-runtime";
import { readConfiguration } from "./config";

class DenyRoot extends RootContext {
  onConfigure(configuration_size: u32): bool {
    readConfiguration(configuration_size);
    return true;
  }

  createContext(context_id: u32): Context {
    return new Deny(context_id, this);
  }
}

class Deny extends Context {
  constructor(context_id: u32, root_context: DenyRoot) {
    super(context_id, root_context);
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    if (stream_context.headers.request.get("x-deny") != "true") {
      return FilterHeadersStatusValues.Continue;
    }
    log(LogLevelValues.info, "denying " + stream_context.headers.request.get(":path"));
    const headers: Headers = [];
    headers.push(new HeaderPair(String.UTF8.encode("x-denied-by"), String.UTF8.encode("deny_403")));
    send_local_response(403, "denied_by_wasm", String.UTF8.encode("forbidden\n"), headers,
      GrpcStatusValues.PermissionDenied);
    return FilterHeadersStatusValues.StopIteration;
  }
}

registerRootContext((context_id: u32) => { return new DenyRoot(context_id); }, "deny_403");
