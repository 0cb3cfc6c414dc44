;; Misbehaving filter: traps (`unreachable`) on a request carrying `x-trap`; otherwise adds
;; `x-trap-filter: ok` to the response.
(module
  (import "env" "proxy_get_header_map_value"
    (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x-trap")
  (data (i32.const 32) "x-trap-filter")  ;; 13
  (data (i32.const 48) "ok")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 200) (i32.const 204)))
      (then unreachable))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 32) (i32.const 13) (i32.const 48) (i32.const 2)))
    (i32.const 0))
)
