;; A proxy-wasm filter written by hand: adds `x-wat-filter: hello-from-wat` to every
;; response and answers 403 to a request carrying `x-deny: true`.
;; Needs no toolchain: the sidecar assembles .wat files when it loads them.
(module
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value"
    (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 16) "x-wat-filter")      ;; 12 bytes
  (data (i32.const 32) "hello-from-wat")    ;; 14 bytes
  (data (i32.const 48) "x-deny")            ;; 6 bytes
  (data (i32.const 64) "denied_by_wat")     ;; 13 bytes
  (data (i32.const 80) "forbidden by wat\n");; 17 bytes
  ;; 200/204: where the host writes a header value's address and size.
  ;; From 1024 up: a bump allocator, reset at every request.
  (global $heap (mut i32) (i32.const 1024))

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    ;; grow when the bump pointer passes the end of memory
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
        (then (return (i32.const 0))))))
    (local.get $ptr))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))

  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32)
    (result i32)
    (global.set $heap (i32.const 1024))
    ;; get_header_map_value(REQUEST_HEADERS, "x-deny") -> NOT_FOUND (1) when absent
    (if (call $get_header (i32.const 0) (i32.const 48) (i32.const 6) (i32.const 200) (i32.const 204))
      (then (return (i32.const 0))))
    ;; value == "true": size 4 and the 4 bytes as one little-endian i32
    (if (i32.and
          (i32.eq (i32.load (i32.const 204)) (i32.const 4))
          (i32.eq (i32.load (i32.load (i32.const 200))) (i32.const 0x65757274)))
      (then
        (drop (call $local_response
          (i32.const 403) (i32.const 64) (i32.const 13) (i32.const 80) (i32.const 17)
          (i32.const 0) (i32.const 0) (i32.const -1)))
        (return (i32.const 1))))
    (i32.const 0))

  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32)
    (result i32)
    (drop (call $add_header (i32.const 2) (i32.const 16) (i32.const 12) (i32.const 32) (i32.const 14)))
    (i32.const 0))
)
