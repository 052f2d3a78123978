;; ACME TH-8 payload codec (flux-abi-1, see README.md#plugins and twin/plugins/abi.py).
;;
;; An ACME TH-8 sensor sends 8-byte binary frames:
;;   0xA5 0x01  int16 BE temperature (0.01 degC)  uint16 BE humidity (0.01 %)  uint16 BE battery (mV)
;; decode() turns each frame of a batch into three readings (temperature, humidity, battery
;; in volts) in the dense readings layout; a frame that is not 8 bytes or has the wrong
;; magic/version gives one bad reading (NaN) on the point "payload".
;; Rebuild the .wasm with:  twin plugin build sites/demo/plugins/acme_th.wat
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  ;; the dense readings header (flux-abi-1, twin/plugins/abi.py): marker 0xFFFFFFFF, count
  ;; (filled in), a table of 4 point names; then 22-byte rows (u32 frame, u16 point, f64 ts, f64 value)
  (data (i32.const 256) "\ff\ff\ff\ff\00\00\00\00\04\00"
    "\0btemperature" "\08humidity" "\07battery" "\07payload")

  ;; make sure [0, end) is inside memory (grow in 64 KiB pages); trap if the cap refuses
  (func $ensure (param $end i32)
    (local $have i32)
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end) (local.get $have)) (i32.const 16)) (i32.const 1)))
              (i32.const -1))
          (then unreachable)))))

  ;; the host calls alloc once per call, before the entry point: a bump heap reset each call
  (func (export "alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (i32.const 1024))
    (global.set $heap (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (call $ensure (global.get $heap))
    (local.get $p))

  ;; one row: frame index, point (into the header's table), ts 0 (= receipt time), value
  (func $row (param $o i32) (param $idx i32) (param $point i32) (param $v f64) (result i32)
    (i32.store (local.get $o) (local.get $idx))
    (i32.store16 offset=4 (local.get $o) (local.get $point))
    (f64.store offset=6 (local.get $o) (f64.const 0))
    (f64.store offset=14 (local.get $o) (local.get $v))
    (i32.add (local.get $o) (i32.const 22)))

  (func $u16be (param $p i32) (result i32)
    (i32.or (i32.shl (i32.load8_u (local.get $p)) (i32.const 8)) (i32.load8_u offset=1 (local.get $p))))

  (func (export "decode") (param $ptr i32) (param $len i32) (result i64)
    (local $n i32) (local $i i32) (local $in i32) (local $out i32) (local $o i32)
    (local $plen i32) (local $pl i32) (local $count i32)
    (local.set $n (i32.load (local.get $ptr)))
    (local.set $in (i32.add (local.get $ptr) (i32.const 4)))
    (local.set $out (global.get $heap))
    ;; the 47-byte header, then at most 3 rows of 22 bytes per frame
    (call $ensure (i32.add (i32.add (local.get $out) (i32.const 47)) (i32.mul (local.get $n) (i32.const 66))))
    (memory.copy (local.get $out) (i32.const 256) (i32.const 47))
    (local.set $o (i32.add (local.get $out) (i32.const 47)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $plen (i32.load (local.get $in)))
        (local.set $pl (i32.add (local.get $in) (i32.const 4)))
        (if (i32.and
              (i32.eq (local.get $plen) (i32.const 8))
              (i32.eq (call $u16be (local.get $pl)) (i32.const 0xA501)))
          (then
            (local.set $o (call $row (local.get $o) (local.get $i) (i32.const 0)
              (f64.div (f64.convert_i32_s (i32.extend16_s (call $u16be (i32.add (local.get $pl) (i32.const 2)))))
                       (f64.const 100))))
            (local.set $o (call $row (local.get $o) (local.get $i) (i32.const 1)
              (f64.div (f64.convert_i32_u (call $u16be (i32.add (local.get $pl) (i32.const 4))))
                       (f64.const 100))))
            (local.set $o (call $row (local.get $o) (local.get $i) (i32.const 2)
              (f64.div (f64.convert_i32_u (call $u16be (i32.add (local.get $pl) (i32.const 6))))
                       (f64.const 1000))))
            (local.set $count (i32.add (local.get $count) (i32.const 3))))
          (else  ;; not a TH-8 frame: one bad reading (NaN) for it
            (local.set $o (call $row (local.get $o) (local.get $i) (i32.const 3) (f64.const nan)))
            (local.set $count (i32.add (local.get $count) (i32.const 1)))))
        (local.set $in (i32.add (local.get $pl) (local.get $plen)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store offset=4 (local.get $out) (local.get $count))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (i32.sub (local.get $o) (local.get $out))))))
