// The ACME TH-8 payload codec in AssemblyScript: a FLUX IoT Wasm plugin (flux-abi-1, see
// README.md#plugins and twin/plugins/abi.py). The same decoder as sites/demo/plugins/acme_th.wat.
//
// An ACME TH-8 sensor sends 8-byte frames:
//   0xA5 0x01  int16 BE temperature (0.01 degC)  uint16 BE humidity (0.01 %)  uint16 BE battery (mV)
// decode() gets a batch of payloads (u32 count, then count x (u32 len, bytes)) and returns three
// readings per frame in the dense layout (numbers only); a payload that is not a TH-8 frame
// gives one bad reading (NaN) on the point "payload".
//
// Build: ./build.sh (npm install + asc: --runtime stub, no GC; --use abort= so the module
// imports nothing — plugins get no imports unless granted).

// A bump heap, reset by alloc(): the host calls alloc() once per call, writes the input there,
// calls the entry point and copies the output out before the next call.
export function alloc(n: i32): i32 {
  heap.reset();
  return <i32>heap.alloc(<usize>n);
}

const POINTS = 4; // the header's point table: temperature, humidity, battery, payload
const ROW = 22; // u32 index, u16 point, f64 ts, f64 value

function u16be(p: usize): i32 {
  return (<i32>load<u8>(p) << 8) | <i32>load<u8>(p + 1);
}

function putName(p: usize, name: string): usize {
  store<u8>(p, <u8>name.length);
  for (let i = 0; i < name.length; i++) store<u8>(p + 1 + <usize>i, <u8>name.charCodeAt(i));
  return p + 1 + <usize>name.length;
}

function row(o: usize, index: u32, point: u16, value: f64): usize {
  store<u32>(o, index);
  store<u16>(o, point, 4);
  store<f64>(o, 0.0, 6); // ts 0: the time of receipt
  store<f64>(o, value, 14);
  return o + ROW;
}

export function decode(ptr: i32, len: i32): i64 {
  const input = <usize>ptr;
  const n = load<u32>(input);
  const out = heap.alloc(64 + <usize>n * 3 * ROW);
  store<u32>(out, 0xffffffff); // the dense layout's marker; the count is filled in below
  store<u16>(out, <u16>POINTS, 8);
  let o = putName(out + 10, "temperature");
  o = putName(o, "humidity");
  o = putName(o, "battery");
  o = putName(o, "payload");
  let at = input + 4;
  let count: u32 = 0;
  for (let i: u32 = 0; i < n; i++) {
    const size = <usize>load<u32>(at);
    const p = at + 4;
    if (size == 8 && u16be(p) == 0xa501) {
      o = row(o, i, 0, <f64>(<i16>u16be(p + 2)) / 100);
      o = row(o, i, 1, <f64>u16be(p + 4) / 100);
      o = row(o, i, 2, <f64>u16be(p + 6) / 1000);
      count += 3;
    } else {
      o = row(o, i, 3, NaN); // a bad reading
      count += 1;
    }
    at = p + size;
  }
  store<u32>(out, count, 4);
  return (<i64>out << 32) | <i64>(o - out);
}
