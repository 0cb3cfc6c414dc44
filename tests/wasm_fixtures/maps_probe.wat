;; Pins down what a filter sees of a call and how its edits land, pseudo-headers included.
;; Request: copies :path into x-seen-path, adds X-Upper: v (the host lower-cases names),
;; rewrites :authority, and reports num_headers and end_of_stream as one digit each.
;; Response: copies :status into x-status-was, rewrites :status to 201, reports
;; num_headers, and copies the properties request.headers.x-a and destination.address.
(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) ":path")                   ;; 5
  (data (i32.const 24) "x-seen-path")             ;; 11
  (data (i32.const 40) "X-Upper")                 ;; 7
  (data (i32.const 48) "v")                       ;; 1
  (data (i32.const 52) ":authority")              ;; 10
  (data (i32.const 64) "rewritten")               ;; 9
  (data (i32.const 80) ":status")                 ;; 7
  (data (i32.const 88) "x-status-was")            ;; 12
  (data (i32.const 104) "201")                    ;; 3
  (data (i32.const 112) "x-n")                    ;; 3
  (data (i32.const 116) "x-resp-n")               ;; 8
  (data (i32.const 128) "request\00headers\00x-a") ;; 19
  (data (i32.const 160) "x-prop-a")               ;; 8
  (data (i32.const 192) "destination\00address")  ;; 19
  (data (i32.const 216) "x-dest")                 ;; 6
  (data (i32.const 224) "x-eos")                  ;; 5
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $ptr))
  ;; add(map, name, name_len) with the value the last get/property call returned
  (func $add_got (param $map i32) (param $name i32) (param $len i32)
    (drop (call $add (local.get $map) (local.get $name) (local.get $len)
      (i32.load (i32.const 300)) (i32.load (i32.const 304)))))
  (func $add_digit (param $map i32) (param $name i32) (param $len i32) (param $at i32) (param $n i32)
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (local.get $n)))
    (drop (call $add (local.get $map) (local.get $name) (local.get $len) (local.get $at) (i32.const 1))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (global.set $heap (i32.const 1024))
    (if (i32.eqz (call $get (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 300) (i32.const 304)))
      (then (call $add_got (i32.const 0) (i32.const 24) (i32.const 11))))
    (drop (call $add (i32.const 0) (i32.const 40) (i32.const 7) (i32.const 48) (i32.const 1)))
    (drop (call $replace (i32.const 0) (i32.const 52) (i32.const 10) (i32.const 64) (i32.const 9)))
    (call $add_digit (i32.const 0) (i32.const 112) (i32.const 3) (i32.const 400) (local.get $n))
    (call $add_digit (i32.const 0) (i32.const 224) (i32.const 5) (i32.const 401) (local.get $eos))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (global.set $heap (i32.const 1024))
    (if (i32.eqz (call $get (i32.const 2) (i32.const 80) (i32.const 7) (i32.const 300) (i32.const 304)))
      (then (call $add_got (i32.const 2) (i32.const 88) (i32.const 12))))
    (drop (call $replace (i32.const 2) (i32.const 80) (i32.const 7) (i32.const 104) (i32.const 3)))
    (call $add_digit (i32.const 2) (i32.const 116) (i32.const 8) (i32.const 402) (local.get $n))
    (if (i32.eqz (call $prop (i32.const 128) (i32.const 19) (i32.const 300) (i32.const 304)))
      (then (call $add_got (i32.const 2) (i32.const 160) (i32.const 8))))
    (if (i32.eqz (call $prop (i32.const 192) (i32.const 19) (i32.const 300) (i32.const 304)))
      (then (call $add_got (i32.const 2) (i32.const 216) (i32.const 6))))
    (i32.const 0))
)
