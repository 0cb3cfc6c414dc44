;; Pause and resume: every request pauses in on_request_headers; the next tick (every
;; 10 ms) switches to the paused stream, adds `x-resumed-by: tick` to its request and
;; continues it. It remembers one paused stream only: one request at a time.
(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick_every (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x-resumed-by")  ;; 12
  (data (i32.const 32) "tick")
  (global $paused (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $tick_every (i32.const 10)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (global.set $paused (local.get $ctx))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (if (global.get $paused)
      (then
        (drop (call $effective (global.get $paused)))
        (drop (call $add (i32.const 0) (i32.const 16) (i32.const 12) (i32.const 32) (i32.const 4)))
        (drop (call $continue (i32.const 0)))
        (global.set $paused (i32.const 0)))))
)
