// Plugin-configuration reading shared by the examples.
//
// Works around a bug in @solo-io/proxy-runtime 0.1.8 (fixed upstream in 2757bba and b4ac2b7,
// not released to npm): the SDK's RootContext.onConfigure passes `configuration_size` as the
// return-size *pointer* of proxy_get_buffer_bytes and calls it even for an empty
// configuration, which traps (out-of-bounds write at 0xfffffffc) or scribbles over memory.
// Root contexts in these examples override onConfigure and call readConfiguration instead.
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

export function readConfiguration(configuration_size: u32): string {
  if (configuration_size == 0) return "";
  const bytes = get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size);
  return String.UTF8.decode(bytes);
}

// The string value of `key` in a flat JSON object such as {"header":"x-a","value":"b"}.
// Enough for example configs (no escapes beyond \" and \\); "" when the key is absent.
export function jsonString(json: string, key: string): string {
  const needle = "\"" + key + "\"";
  let at = json.indexOf(needle);
  if (at < 0) return "";
  at = json.indexOf(":", at + needle.length);
  if (at < 0) return "";
  at = json.indexOf("\"", at + 1);
  if (at < 0) return "";
  let out = "";
  for (let i = at + 1; i < json.length; i++) {
    const c = json.charAt(i);
    if (c == "\\" && i + 1 < json.length) {
      i++;
      out += json.charAt(i);
    } else if (c == "\"") {
      return out;
    } else {
      out += c;
    }
  }
  return "";
}
