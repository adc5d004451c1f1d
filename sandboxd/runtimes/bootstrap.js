// sandboxd's node bootstrap: the first and only script a jailed node worker runs.
//
// The worker is already jailed (chroot, uid, seccomp) when node starts on this
// file. It reports ready on fd 3, waits for exactly one job on fd 0 (a 4-byte
// big-endian length, a msgpack JobHeader {code, preload, timeout, memory_mb},
// then the job's stdin bytes until EOF), runs the code as a CommonJS main
// module and lets node exit the way it would for `node /tmp/main.js`.
//
// Nothing here reports an outcome: the keeper reads the exit status with wait4.
'use strict';

const fs = require('fs');
const Module = require('module');
const path = require('path');
const { Writable } = require('stream');

const JOB_FD = 0;
const READY_FD = 3;
const LENGTH_BYTES = 4;
const MAIN_FILE = '/tmp/main.js';
const PRELOAD_FILE = '/tmp/preload.js';

// ---------------------------------------------------------------------------
// Blocking reads and writes on the worker's pipes.

const sleepCell = new Int32Array(new SharedArrayBuffer(4));

function retryable(error) {
  return error.code === 'EAGAIN' || error.code === 'EINTR';
}

// Exactly `size` bytes from fd, or null at EOF before the first byte.
function readExact(fd, size) {
  const buffer = Buffer.allocUnsafe(size);
  let got = 0;
  while (got < size) {
    let count;
    try {
      count = fs.readSync(fd, buffer, got, size - got, null);
    } catch (error) {
      if (!retryable(error)) throw error;
      Atomics.wait(sleepCell, 0, 0, 1);
      continue;
    }
    if (count === 0) {
      if (got === 0) return null;
      throw new Error('sandboxd: the job stream ended early');
    }
    got += count;
  }
  return buffer;
}

function writeAll(fd, buffer) {
  let done = 0;
  while (done < buffer.length) {
    try {
      done += fs.writeSync(fd, buffer, done, buffer.length - done);
    } catch (error) {
      // EAGAIN only if user code made the pipe non-blocking (e.g. net.Socket({fd: 1})).
      if (!retryable(error)) throw error;
      Atomics.wait(sleepCell, 0, 0, 1);
    }
  }
}

// ---------------------------------------------------------------------------
// The job header: msgpack, restricted to what msgspec emits for JobHeader
// (a map of str keys to str, float, int, bool or nil values).

function decodeMsgpack(buffer) {
  let at = 0;
  const take = (size) => {
    if (at + size > buffer.length) throw new Error('sandboxd: truncated job header');
    const start = at;
    at += size;
    return start;
  };
  const string = (size) => {
    const start = take(size);
    return buffer.toString('utf8', start, start + size);
  };
  const value = () => {
    const byte = buffer[take(1)];
    if (byte <= 0x7f) return byte;
    if (byte >= 0xe0) return byte - 0x100;
    if ((byte & 0xe0) === 0xa0) return string(byte & 0x1f);
    if ((byte & 0xf0) === 0x80) return map(byte & 0x0f);
    switch (byte) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xca: return buffer.readFloatBE(take(4));
      case 0xcb: return buffer.readDoubleBE(take(8));
      case 0xcc: return buffer.readUInt8(take(1));
      case 0xcd: return buffer.readUInt16BE(take(2));
      case 0xce: return buffer.readUInt32BE(take(4));
      case 0xcf: return Number(buffer.readBigUInt64BE(take(8)));
      case 0xd0: return buffer.readInt8(take(1));
      case 0xd1: return buffer.readInt16BE(take(2));
      case 0xd2: return buffer.readInt32BE(take(4));
      case 0xd3: return Number(buffer.readBigInt64BE(take(8)));
      case 0xd9: return string(buffer.readUInt8(take(1)));
      case 0xda: return string(buffer.readUInt16BE(take(2)));
      case 0xdb: return string(buffer.readUInt32BE(take(4)));
      case 0xde: return map(buffer.readUInt16BE(take(2)));
      case 0xdf: return map(buffer.readUInt32BE(take(4)));
      default: throw new Error(`sandboxd: unexpected msgpack byte 0x${byte.toString(16)}`);
    }
  };
  const map = (size) => {
    const result = Object.create(null);
    for (let i = 0; i < size; i++) {
      const key = value();
      if (typeof key !== 'string') throw new Error('sandboxd: non-string key in job header');
      result[key] = value();
    }
    return result;
  };
  const result = value();
  if (at !== buffer.length) throw new Error('sandboxd: trailing bytes after the job header');
  return result;
}

function readJob() {
  const prefix = readExact(JOB_FD, LENGTH_BYTES);
  if (prefix === null) return null;
  const body = readExact(JOB_FD, prefix.readUInt32BE(0));
  if (body === null) throw new Error('sandboxd: the job stream ended early');
  const job = decodeMsgpack(body);
  if (typeof job.code !== 'string' || typeof job.preload !== 'string') {
    throw new Error('sandboxd: malformed job header');
  }
  return job;
}

// ---------------------------------------------------------------------------
// stdout and stderr. node writes to pipes asynchronously, so process.exit()
// could drop what was still queued. These streams write synchronously to the
// blocking pipes instead: every byte is in the pipe before write() returns.

class SyncFdStream extends Writable {
  constructor(fd) {
    super({ decodeStrings: true });
    this.fd = fd;
  }

  _write(chunk, encoding, callback) {
    try {
      writeAll(this.fd, chunk);
    } catch (error) {
      callback(error);
      return;
    }
    callback();
  }

  // end() or destroy() by user code must not close the worker's stdout/stderr.
  _destroy(error, callback) {
    callback(error);
  }
}

function installStdio() {
  for (const [name, fd] of [['stdout', 1], ['stderr', 2]]) {
    const stream = new SyncFdStream(fd);
    Object.defineProperty(process, name, {
      configurable: true,
      enumerable: true,
      get: () => stream,
    });
  }
}

// ---------------------------------------------------------------------------
// Running the code: a fresh CommonJS module per source, sloppy mode, with its
// own require, module, exports, __filename and __dirname. User code sees none
// of this file's variables.

function newModule(filename) {
  const module = new Module(filename, null);
  module.filename = filename;
  module.paths = Module._nodeModulePaths(path.dirname(filename));
  return module;
}

function runModule(filename, source) {
  const module = newModule(filename);
  module.id = '.';
  process.mainModule = module; // require.main === module, as for `node file.js`
  module._compile(source, filename);
  module.loaded = true;
}

// The paths every run takes, run once before the worker reports ready so that V8
// has compiled them: the first console.log alone costs over a millisecond cold.
// Only those: a worker runs one job, so warming what few jobs use (inspecting
// objects, formatting errors) would cost every run CPU that most never get back.
function warmUp() {
  const sink = new Writable({ write: (chunk, encoding, callback) => callback() });
  new console.Console(sink, sink).log('warm');
  newModule('/tmp/warm.js')._compile('module.exports = 1', '/tmp/warm.js');
  JSON.stringify(JSON.parse(Buffer.from('eyJhIjpbMV19', 'base64').toString('utf8')));
}

// When the event loop runs dry, end the process the way process.exit() does:
// node's full teardown after a natural exit costs several milliseconds more.
// Skipped on a fatal exception, whose 'exit' event comes before node prints
// the error: the slow path prints it.
function exitPromptly() {
  let fatal = false;
  const exitNow = () => {
    if (!fatal) process.reallyExit(process.exitCode || 0);
  };
  process.on('uncaughtExceptionMonitor', () => {
    fatal = true;
  });
  // Re-added on every 'beforeExit' so that it runs after the user's own 'exit' listeners.
  process.on('beforeExit', () => {
    process.removeListener('exit', exitNow);
    process.on('exit', exitNow);
  });
}

function main() {
  installStdio();
  // Runs with network and [network] proxy: node's http, https and fetch go through it.
  const proxy = process.env.HTTP_PROXY;
  if (proxy) require(path.join(__dirname, 'proxy.js')).install(proxy);
  warmUp();
  writeAll(READY_FD, Buffer.from('ok'));
  fs.closeSync(READY_FD);
  const job = readJob();
  if (job === null) process.exit(0); // retired without a job
  delete require.cache[__filename];
  process.argv[1] = MAIN_FILE;
  exitPromptly();
  if (job.preload) runModule(PRELOAD_FILE, job.preload);
  runModule(MAIN_FILE, job.code);
}

main();
