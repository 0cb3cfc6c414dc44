;; Starts the way an AssemblyScript SDK filter does when a setting is missing (the SDK's
;; own build: tests/wasm_fixtures/sdk_default_configure.ts, in the integration tier):
;; - root_id empty: logs "Missing root context factory for root id: " at critical, then
;;   calls proc_exit (the SDK's abort), while the root context is created;
;; - configuration empty: proxy_on_configure reads out of bounds (a memory fault).
;; With both given it adds `x-started: yes` to the response.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_unstable" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "plugin_root_id")  ;; 14
  (data (i32.const 64) "Missing root context factory for root id: ")  ;; 42
  (data (i32.const 128) "x-started")  ;; 9
  (data (i32.const 144) "yes")
  (global $next (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_0"))
  (func (export "malloc") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $size)))
    (local.get $at))
  (func (export "proxy_on_context_create") (param $id i32) (param $parent i32)
    (if (i32.ne (local.get $parent) (i32.const 0)) (then (return)))
    (drop (call $property (i32.const 16) (i32.const 14) (i32.const 200) (i32.const 204)))
    (if (i32.eqz (i32.load (i32.const 204)))
      (then
        (drop (call $log (i32.const 5) (i32.const 64) (i32.const 42)))
        (call $exit (i32.const 255)))))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (if (i32.eqz (local.get $size))
      (then (drop (i32.load (i32.const 0xfffffffc)))))
    (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 128) (i32.const 9) (i32.const 144) (i32.const 3)))
    (i32.const 0))
)
