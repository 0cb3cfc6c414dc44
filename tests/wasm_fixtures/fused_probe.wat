;; Exercises what the host does between callbacks it may run in one call into wasm.
;; on_context_create (a stream's): looks up :path (the request must not show yet) and sets
;; the effective context to the root (it must not outlive the callback).
;; on_request_headers: adds x-create-saw: <the lookup's status digit>.
;; on_response_headers: adds x-resp: yes; answers 418 locally if the request has x-local.
;; on_done / on_log / on_delete count themselves in metrics done, log and delete;
;; on_done traps if the request has x-trap-done.
(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) ":path")          ;; 5
  (data (i32.const 24) "x-create-saw")   ;; 12
  (data (i32.const 40) "x-resp")         ;; 6
  (data (i32.const 48) "yes")            ;; 3
  (data (i32.const 56) "x-local")        ;; 7
  (data (i32.const 64) "x-trap-done")    ;; 11
  (data (i32.const 80) "done")           ;; 4
  (data (i32.const 88) "log")            ;; 3
  (data (i32.const 92) "delete")         ;; 6
  (data (i32.const 100) "local")         ;; 5
  ;; 300/304: a looked-up value; 400: the create-time status digit; 500..508: metric ids
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $ptr))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $define (i32.const 0) (i32.const 80) (i32.const 4) (i32.const 500)))
    (drop (call $define (i32.const 0) (i32.const 88) (i32.const 3) (i32.const 504)))
    (drop (call $define (i32.const 0) (i32.const 92) (i32.const 6) (i32.const 508)))
    (i32.const 1))
  (func $has (param $map i32) (param $name i32) (param $len i32) (result i32)
    (i32.eqz (call $get (local.get $map) (local.get $name) (local.get $len)
      (i32.const 300) (i32.const 304))))
  (func (export "proxy_on_context_create") (param $ctx i32) (param $root i32)
    (if (i32.eqz (local.get $root)) (then (return)))
    (global.set $heap (i32.const 1024))
    (i32.store8 (i32.const 400) (i32.add (i32.const 48)
      (call $get (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 300) (i32.const 304))))
    (drop (call $effective (local.get $root))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 0) (i32.const 24) (i32.const 12) (i32.const 400) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 40) (i32.const 6) (i32.const 48) (i32.const 3)))
    (if (call $has (i32.const 0) (i32.const 56) (i32.const 7))
      (then (drop (call $local (i32.const 418) (i32.const 100) (i32.const 5)
                    (i32.const 100) (i32.const 5) (i32.const 0) (i32.const 0) (i32.const -1)))))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32)
    (drop (call $increment (i32.load (i32.const 500)) (i64.const 1)))
    (if (call $has (i32.const 0) (i32.const 64) (i32.const 11)) (then unreachable))
    (i32.const 1))
  (func (export "proxy_on_log") (param i32)
    (drop (call $increment (i32.load (i32.const 504)) (i64.const 1))))
  (func (export "proxy_on_delete") (param i32)
    (drop (call $increment (i32.load (i32.const 508)) (i64.const 1))))
)
