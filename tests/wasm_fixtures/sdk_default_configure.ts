// An AssemblyScript SDK filter that keeps the SDK's own onConfigure (the examples
// override it): with an empty plugin configuration that onConfigure reads out of bounds
// (wasm_examples/assemblyscript/README.md, "SDK bug"), the memory fault a new user hits.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
} from "@solo-io/proxy-runtime";

class PlainRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Plain(context_id, this);
  }
}

class Plain extends Context {
  constructor(context_id: u32, root_context: PlainRoot) {
    super(context_id, root_context);
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-plain", "1");
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new PlainRoot(context_id); }, "plain");
