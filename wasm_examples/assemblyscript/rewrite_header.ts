// Rewrites (replaces) a request header from the plugin configuration JSON:
//   {"header": "x-env", "value": "prod"}  ->  every request leaves with `x-env: prod`.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  log, LogLevelValues,
} from "@solo-io/proxy-runtime";
import { readConfiguration, jsonString } from "./config";

class RewriteRoot extends RootContext {
  header: string = "";
  value: string = "";

  onConfigure(configuration_size: u32): bool {
    const json = readConfiguration(configuration_size);
    this.header = jsonString(json, "header");
    this.value = jsonString(json, "value");
    if (this.header == "") {
      log(LogLevelValues.error, "rewrite_header: configuration needs {\"header\": ..., \"value\": ...}");
      return false;
    }
    return true;
  }

  createContext(context_id: u32): Context {
    return new Rewrite(context_id, this);
  }
}

class Rewrite extends Context {
  header: string;
  value: string;

  constructor(context_id: u32, root_context: RewriteRoot) {
    super(context_id, root_context);
    this.header = root_context.header;
    this.value = root_context.value;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.request.replace(this.header, this.value);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new RewriteRoot(context_id); }, "rewrite_header");
