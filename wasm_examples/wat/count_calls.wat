;; Counts calls in a counter metric, `wat_calls_total`, defined when the plugin starts,
;; and logs the running total at DEBUG.
(module
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment (param i32 i64) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "wat_calls_total")  ;; 15 bytes
  (data (i32.const 48) "counted a call")   ;; 14 bytes
  (global $metric (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    ;; proxy_define_metric(COUNTER, name, len, &id at 8)
    (drop (call $define (i32.const 0) (i32.const 16) (i32.const 15) (i32.const 8)))
    (global.set $metric (i32.load (i32.const 8)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $increment (global.get $metric) (i64.const 1)))
    (drop (call $log (i32.const 1) (i32.const 48) (i32.const 14)))
    (i32.const 0))
)
