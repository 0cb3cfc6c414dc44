;; Pauses every request, then traps in the next tick: the paused call must fail at once
;; (not wait out the pause limit).
(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick_every (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $tick_every (i32.const 10))) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_tick") (param i32) unreachable))
