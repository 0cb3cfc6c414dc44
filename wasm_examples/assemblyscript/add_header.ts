// Adds a response header: `hello: <plugin configuration>` ("world!" when none is given).
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
} from "@solo-io/proxy-runtime";
import { readConfiguration } from "./config";

class AddHeaderRoot extends RootContext {
  value: string = "world!";

  onConfigure(configuration_size: u32): bool {
    const configured = readConfiguration(configuration_size);
    if (configured != "") this.value = configured;
    return true;
  }

  createContext(context_id: u32): Context {
    return new AddHeader(context_id, this);
  }
}

class AddHeader extends Context {
  value: string;

  constructor(context_id: u32, root_context: AddHeaderRoot) {
    super(context_id, root_context);
    this.value = root_context.value;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("hello", this.value);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new AddHeaderRoot(context_id); }, "add_header");
