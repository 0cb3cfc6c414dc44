//! A proxy-wasm filter in Rust on the raw ABI (no SDK, no crates): sets a response header
//! named in the plugin configuration JSON, `{"header": "x-served-by", "value": "rust"}`,
//! and counts the responses it touched in the counter `rust_responses_total`.
//!
//! Built with Debian's rustc and its wasm32 standard library (see build.sh): the SDK crate
//! would need crates.io, this needs nothing but the compiler.

use std::mem;

extern "C" {
    fn proxy_log(level: u32, ptr: *const u8, size: usize) -> u32;
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, ptr: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(map: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, delta: i64) -> u32;
}

const PLUGIN_CONFIGURATION: u32 = 7;
const RESPONSE_HEADERS: u32 = 2;
const COUNTER: u32 = 0;
const LOG_INFO: u32 = 2;
const LOG_ERROR: u32 = 4;

static mut HEADER: Vec<u8> = Vec::new();
static mut VALUE: Vec<u8> = Vec::new();
static mut METRIC: u32 = 0;

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host copies data into guest memory through this (cpp-host looks up `malloc` first).
#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut u8 {
    let mut buf: Vec<u8> = Vec::with_capacity(size.max(1));
    let ptr = buf.as_mut_ptr();
    mem::forget(buf);
    ptr
}

fn log(level: u32, message: &str) {
    unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

/// The string value of `key` in a flat JSON object (no escapes): enough for this config.
fn json_string(json: &[u8], key: &str) -> Option<Vec<u8>> {
    let needle = format!("\"{}\"", key);
    let text = std::str::from_utf8(json).ok()?;
    let at = text.find(&needle)? + needle.len();
    let rest = &text[at..];
    let colon = rest.find(':')?;
    let rest = rest[colon + 1..].trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].as_bytes().to_vec())
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> u32 {
    let name = "rust_responses_total";
    unsafe {
        let mut id = 0u32;
        proxy_define_metric(COUNTER, name.as_ptr(), name.len(), &mut id);
        METRIC = id;
    }
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root: u32, size: usize) -> u32 {
    let mut ptr: *mut u8 = std::ptr::null_mut();
    let mut len: usize = 0;
    let config = unsafe {
        if size == 0 || proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &mut ptr, &mut len) != 0 {
            Vec::new()
        } else {
            Vec::from_raw_parts(ptr, len, len)
        }
    };
    match (json_string(&config, "header"), json_string(&config, "value")) {
        (Some(header), Some(value)) if !header.is_empty() => {
            unsafe {
                HEADER = header;
                VALUE = value;
            }
            log(LOG_INFO, "rust filter configured");
            1
        }
        _ => {
            log(LOG_ERROR, "configuration must be {\"header\": ..., \"value\": ...}");
            0
        }
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(_ctx: u32, _headers: u32, _eos: u32) -> u32 {
    unsafe {
        proxy_replace_header_map_value(RESPONSE_HEADERS, HEADER.as_ptr(), HEADER.len(), VALUE.as_ptr(), VALUE.len());
        proxy_increment_metric(METRIC, 1);
    }
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_done(_ctx: u32) -> u32 {
    1
}
