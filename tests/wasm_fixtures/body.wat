;; Bodies (with buffer_bodies: true): the request body is copied into a request header
;; `x-body-was` and replaced by "REPLACED"; " + wasm" is appended to the response body.
(module
  (import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "REPLACED")     ;; 8
  (data (i32.const 32) " + wasm")      ;; 7
  (data (i32.const 48) "x-body-was")   ;; 10
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $ptr))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (global.set $heap (i32.const 1024))
    (if (i32.eqz (call $get (i32.const 0) (i32.const 0) (local.get $size) (i32.const 200) (i32.const 204)))
      (then (drop (call $add (i32.const 0) (i32.const 48) (i32.const 10)
                    (i32.load (i32.const 200)) (i32.load (i32.const 204))))))
    (drop (call $set (i32.const 0) (i32.const 0) (local.get $size) (i32.const 16) (i32.const 8)))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (drop (call $set (i32.const 1) (local.get $size) (i32.const 0) (i32.const 32) (i32.const 7)))
    (i32.const 0))
)
