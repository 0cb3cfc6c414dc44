;; Calls out: on_request_headers dispatches GET /callout to the upstream named "callee"
;; and pauses; when the callout's response arrives, adds its :status to the paused
;; request as `x-callout-status` and continues it.
(module
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "callee")
  (data (i32.const 32) ":status")            ;; 7
  (data (i32.const 48) "x-callout-status")   ;; 16
  ;; the callout's headers, serialized: :method GET, :path /callout, :authority callee
  (data (i32.const 256) "\03\00\00\00\07\00\00\00\03\00\00\00\05\00\00\00\08\00\00\00\0a\00\00\00\06\00\00\00\3a\6d\65\74\68\6f\64\00\47\45\54\00\3a\70\61\74\68\00\2f\63\61\6c\6c\6f\75\74\00\3a\61\75\74\68\6f\72\69\74\79\00\63\61\6c\6c\65\65\00")
  (global $heap (mut i32) (i32.const 1024))
  (global $paused (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $ptr))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (global.set $paused (local.get $ctx))
    ;; a refused callout (BAD_ARGUMENT...) lets the request go on untouched
    (if (call $http_call (i32.const 16) (i32.const 6) (i32.const 256) (i32.const 73)
          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 5000) (i32.const 8))
      (then (return (i32.const 0))))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (global.set $heap (i32.const 1024))
    (drop (call $effective (global.get $paused)))
    (if (i32.eqz (call $get (i32.const 6) (i32.const 32) (i32.const 7) (i32.const 200) (i32.const 204)))
      (then (drop (call $add (i32.const 0) (i32.const 48) (i32.const 16)
                    (i32.load (i32.const 200)) (i32.load (i32.const 204))))))
    (drop (call $continue (i32.const 0))))
)
