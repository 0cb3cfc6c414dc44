;; Misbehaving filter: spins forever on a request carrying `x-loop` (any value).
(module
  (import "env" "proxy_get_header_map_value"
    (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x-loop")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 200) (i32.const 204)))
      (then (loop $forever (br $forever))))
    (i32.const 0))
)
