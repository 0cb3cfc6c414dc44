;; Misbehaving filter: on a request carrying `x-grow`, grows memory 1 MiB at a time until
;; the host refuses (memory.grow answers -1 at the store's cap), then aborts as an
;; allocator would on out-of-memory.
(module
  (import "env" "proxy_get_header_map_value"
    (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x-grow")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 200) (i32.const 204)))
      (then
        (loop $more
          (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
        unreachable))
    (i32.const 0))
)
