;; Declares imports this host does not implement (a made-up proxy_* function, a gRPC call,
;; a function from an unknown module): it must still load. Calls the made-up one on each
;; request and, when the answer is UNIMPLEMENTED (12), adds `x-unimplemented: yes`.
(module
  (import "env" "proxy_made_up" (func $made_up (param i32) (result i32)))
  (import "env" "proxy_grpc_call"
    (func $grpc (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "elsewhere" "thing" (func $thing (param i64) (result i64)))
  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x-unimplemented")  ;; 15
  (data (i32.const 32) "yes")
  (global $answer (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_0"))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $answer (call $made_up (i32.const 7)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (global.get $answer) (i32.const 12))
      (then (drop (call $add (i32.const 2) (i32.const 16) (i32.const 15) (i32.const 32) (i32.const 3)))))
    (i32.const 0))
)
