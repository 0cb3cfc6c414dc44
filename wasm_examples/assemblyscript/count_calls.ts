// Counts calls in a counter metric (`wasm_calls_total` unless the configuration names another).
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, Counter,
} from "@solo-io/proxy-runtime";
import { readConfiguration } from "./config";

class CountRoot extends RootContext {
  calls: Counter | null = null;

  onConfigure(configuration_size: u32): bool {
    let name = readConfiguration(configuration_size);
    if (name == "") name = "wasm_calls_total";
    this.calls = new Counter(name);
    return true;
  }

  createContext(context_id: u32): Context {
    return new Count(context_id, this);
  }
}

class Count extends Context {
  root: CountRoot;

  constructor(context_id: u32, root_context: CountRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const calls = this.root.calls;
    if (calls != null) calls.increment(1);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new CountRoot(context_id); }, "count_calls");
