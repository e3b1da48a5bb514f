#!/usr/bin/env node
// A kiln backend plugin in Node.js (@grpc/grpc-js, @grpc/proto-loader), written from
// proto/backend/v1/README.md alone: a host-style backend whose environments are private
// directories of this machine. Declares no optional feature (no stdin, tty, local_copy,
// image_build, exec_files, exec_timeout, health) and no container layer, so the conformance
// suite checks the rest and expects UNIMPLEMENTED for those. See README.md.
'use strict';

const childProcess = require('child_process');
const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const tar = require('./tar');

const PROTO_ROOT = path.resolve(__dirname, '../../proto');
const MAX_MESSAGE = 16 * 1024 * 1024;
const CHUNK = 256 * 1024;
const KEEPALIVE_MS = 10000;
const DEFAULT_GRACE_MS = 2000;
const INSTANCE_ID = crypto.randomBytes(16).toString('hex');
const SERVICE = 'kiln.backend.v1.Backend';
const ID_RE = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

const log = (...a) => process.stderr.write(`kiln-node: ${a.join(' ')}\n`);

// ------------------------------------------------------------------------------------------
// Errors: a status code, a message, and an ErrorDetail in a google.rpc.Status (§7.2), encoded
// by hand (three tiny messages; see proto/google/rpc/status.proto).

const FAULT = { UNSPECIFIED: 0, USER: 1, INFRASTRUCTURE: 2, CONFIG: 3 };

function varint(n) {
  const out = [];
  let v = BigInt(n);
  if (v < 0n) v += 1n << 64n;
  do {
    let b = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) b |= 0x80;
    out.push(b);
  } while (v > 0n);
  return Buffer.from(out);
}
const field = (no, wire, payload) =>
  wire === 0
    ? Buffer.concat([varint((no << 3) | 0), varint(payload)])
    : Buffer.concat([varint((no << 3) | 2), varint(payload.length), payload]);

class PluginError extends Error {
  constructor(code, message, fault, fieldName, retryable) {
    super(message);
    this.code = code;
    this.fault = fault || FAULT.UNSPECIFIED;
    this.field = fieldName || '';
    this.retryable = !!retryable;
  }

  toStatus() {
    const detail = Buffer.concat([
      this.fault ? field(1, 0, this.fault) : Buffer.alloc(0),
      this.retryable ? field(2, 0, 1) : Buffer.alloc(0),
      this.field ? field(3, 2, Buffer.from(this.field)) : Buffer.alloc(0),
    ]);
    const any = Buffer.concat([
      field(1, 2, Buffer.from('type.googleapis.com/kiln.backend.v1.ErrorDetail')),
      field(2, 2, detail),
    ]);
    const status = Buffer.concat([
      field(1, 0, this.code),
      field(2, 2, Buffer.from(this.message)),
      field(3, 2, any),
    ]);
    const metadata = new grpc.Metadata();
    metadata.set('grpc-status-details-bin', status);
    return { code: this.code, details: this.message, metadata };
  }
}

const S = grpc.status;
const invalid = (m, f, fault) => new PluginError(S.INVALID_ARGUMENT, m, fault || FAULT.USER, f);
const notFound = (m, f) => new PluginError(S.NOT_FOUND, m, FAULT.UNSPECIFIED, f);
const exists = (m, f) => new PluginError(S.ALREADY_EXISTS, m, FAULT.UNSPECIFIED, f);
const unimplemented = (m, f) => new PluginError(S.UNIMPLEMENTED, m, FAULT.CONFIG, f);
const denied = (m, f) => new PluginError(S.PERMISSION_DENIED, m, FAULT.USER, f);
const internal = (m) => new PluginError(S.INTERNAL, m, FAULT.INFRASTRUCTURE);

function toStatus(e) {
  if (e instanceof PluginError) return e.toStatus();
  return internal(`internal error: ${e && e.message ? e.message : e}`).toStatus();
}

function checkId(id, name) {
  if (typeof id !== 'string' || !ID_RE.test(id)) {
    throw invalid(
      `${name} ${JSON.stringify(id)} is not a valid id: [a-z0-9-], 1 to 63 characters, not ` +
        'starting or ending with "-"',
      name,
    );
  }
}

// ------------------------------------------------------------------------------------------
// Per-call metadata (§2.3): the version every call names, the instance id every answer carries.

function checkVersion(call) {
  const v = call.metadata.get('kiln-protocol-version');
  if (v.length === 0) return;
  const offered = String(v[0]).split(',').map((s) => s.trim());
  if (!offered.includes('1')) {
    throw new PluginError(
      S.FAILED_PRECONDITION,
      `protocol version mismatch: the client speaks ${v[0]}, plugin "node-host" speaks 1`,
      FAULT.CONFIG,
    );
  }
}

function instanceMetadata() {
  const md = new grpc.Metadata();
  md.set('kiln-instance-id', INSTANCE_ID);
  return md;
}

function unary(fn, checkHeader = true) {
  return (call, callback) => {
    Promise.resolve()
      .then(() => {
        if (checkHeader) checkVersion(call);
        return fn(call.request, call);
      })
      .then(
        (answer) => {
          call.sendMetadata(instanceMetadata());
          callback(null, answer);
        },
        (e) => callback(toStatus(e)),
      );
  };
}

// ------------------------------------------------------------------------------------------
// Environments: ROOT/<id>/ (0700) with env.json, written first; workspace, temp, runner,
// tool-cache; `execs` (every exec id used, for §4.6 across restarts), `pgids` and `cgroup`.

class Backend {
  constructor(root) {
    fs.mkdirSync(root, { recursive: true, mode: 0o700 });
    this.root = fs.realpathSync(root);
    this.execs = new Map(); // exec id -> handle
    this.cgroups = new Cgroups(this.root);
  }

  dir(id) {
    return path.join(this.root, id);
  }

  meta(id) {
    try {
      return JSON.parse(fs.readFileSync(path.join(this.dir(id), 'env.json'), 'utf8'));
    } catch (e) {
      return null;
    }
  }

  liveEnv(id) {
    checkId(id, 'environment_id');
    const meta = this.meta(id);
    if (!meta) throw notFound(`environment "${id}" does not exist`, 'environment_id');
    return meta;
  }

  checkContainer(id) {
    checkId(id, 'container_id');
    if (id !== 'host') throw notFound(`container "${id}" does not exist`, 'container_id');
  }

  capabilities(req) {
    const offered = req.protocol_versions || [];
    if (offered.length > 0 && !offered.includes(1)) {
      throw new PluginError(
        S.FAILED_PRECONDITION,
        `protocol version mismatch: the client speaks [${offered.join(', ')}], plugin ` +
          '"node-host" speaks 1',
        FAULT.CONFIG,
      );
    }
    const none = {
      support: 1,
      detail: 'the node host plugin runs steps directly on this machine; configure a docker ' +
        'plugin for container:, services: and docker steps',
    };
    return {
      plugin_name: 'node-host',
      plugin_version: '0.1.0',
      protocol_version: 1,
      instance_id: INSTANCE_ID,
      environment: { support: 2 },
      job_container: none,
      service_containers: none,
      step_containers: none,
      features: {},
      os: 'linux',
      arch: { x64: 'amd64', arm64: 'arm64' }[process.arch] || process.arch,
      max_message_bytes: MAX_MESSAGE,
    };
  }

  create(req) {
    checkId(req.environment_id, 'environment_id');
    const owner = req.owner || {};
    const options = structToJson(req.options);
    for (const key of Object.keys(options)) {
      throw invalid(`option "${key}" is not known: this plugin takes no options`, `options.${key}`, FAULT.CONFIG);
    }
    const spec = canonical({
      label: req.label,
      options,
      hints: req.hints || {},
      owner: { ...owner, created_at_unix_ms: 0, labels: owner.labels || {} },
    });
    const hash = crypto.createHash('sha256').update(spec).digest('hex');
    const dir = this.dir(req.environment_id);
    let meta = this.meta(req.environment_id);
    if (meta && meta.spec_hash !== hash) {
      throw exists(
        `environment "${req.environment_id}" exists with another spec`,
        'environment_id',
      );
    }
    if (!meta) {
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
      meta = {
        id: req.environment_id,
        spec_hash: hash,
        label: req.label,
        owner: {
          runner_id: owner.runner_id || '',
          boot_id: owner.boot_id || '',
          job_id: owner.job_id || '',
          parent_environment_id: owner.parent_environment_id || '',
          created_at_unix_ms: Date.now(),
          expires_at_unix_ms: Number(owner.expires_at_unix_ms || 0),
          labels: owner.labels || {},
        },
        paths: {
          workspace: path.join(dir, 'workspace'),
          temp: path.join(dir, 'temp'),
          tool_cache: path.join(dir, 'tool-cache'),
          runner_files: path.join(dir, 'runner'),
          home: os.homedir(),
        },
      };
      const tmp = path.join(dir, 'env.json.tmp');
      fs.writeFileSync(tmp, JSON.stringify(meta), { mode: 0o600 });
      fs.renameSync(tmp, path.join(dir, 'env.json'));
    }
    for (const k of ['workspace', 'temp', 'tool_cache', 'runner_files']) {
      fs.mkdirSync(meta.paths[k], { recursive: true, mode: 0o700 });
    }
    return this.environment(meta);
  }

  environment(meta) {
    return {
      id: meta.id,
      primary_container_id: 'host',
      os: 'linux',
      arch: { x64: 'amd64', arm64: 'arm64' }[process.arch] || process.arch,
      paths: meta.paths,
      path_variable: 'PATH',
      path_separator: ':',
      owner: meta.owner,
    };
  }

  inspect(req) {
    this.liveEnv(req.environment_id);
    this.checkContainer(req.container_id);
    return { id: 'host', state: 2, health: 1, image_env: [] };
  }

  list(req) {
    const out = [];
    for (const name of fs.readdirSync(this.root)) {
      if (!ID_RE.test(name)) continue;
      const meta = this.meta(name);
      if (!meta) continue;
      if (req.runner_id && meta.owner.runner_id !== req.runner_id) continue;
      const labels = req.labels || {};
      if (!Object.keys(labels).every((k) => meta.owner.labels[k] === labels[k])) continue;
      out.push({ id: meta.id, owner: meta.owner, container_ids: ['host'] });
    }
    return { environments: out };
  }

  usedExecIds(envId) {
    try {
      return new Set(fs.readFileSync(path.join(this.dir(envId), 'execs'), 'utf8').split('\n'));
    } catch (e) {
      return new Set();
    }
  }

  async remove(req) {
    checkId(req.environment_id, 'environment_id');
    if (req.container_id) {
      checkId(req.container_id, 'container_id');
      return { existed: false };
    }
    const dir = this.dir(req.environment_id);
    if (!fs.existsSync(dir)) return { existed: false };
    const grace = req.grace_ms || DEFAULT_GRACE_MS;
    const meta = this.meta(req.environment_id);
    // No new exec from now on: env.json goes first.
    fs.rmSync(path.join(dir, 'env.json'), { force: true });
    await this.cgroups.endAll(req.environment_id, dir, grace);
    await endByEvidence(dir, meta ? meta.owner.created_at_unix_ms : 0, grace);
    for (const [id, h] of this.execs) {
      if (h.envId === req.environment_id) this.execs.delete(id);
    }
    fs.rmSync(dir, { recursive: true, force: true });
    return { existed: true };
  }
}

function structToJson(s) {
  const out = {};
  const value = (v) => {
    if (!v) return null;
    if ('stringValue' in v || 'string_value' in v) return v.stringValue ?? v.string_value;
    if ('numberValue' in v || 'number_value' in v) return v.numberValue ?? v.number_value;
    if ('boolValue' in v || 'bool_value' in v) return v.boolValue ?? v.bool_value;
    if ('structValue' in v || 'struct_value' in v) return structToJson(v.structValue || v.struct_value);
    if ('listValue' in v || 'list_value' in v) return ((v.listValue || v.list_value).values || []).map(value);
    return null;
  };
  for (const [k, v] of Object.entries((s && s.fields) || {})) out[k] = value(v);
  return out;
}

function canonical(v) {
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(',')}}`;
  }
  return JSON.stringify(v === undefined ? null : typeof v === 'bigint' ? Number(v) : v);
}

// ------------------------------------------------------------------------------------------
// Every process of an environment ends with Remove (§5.12): one cgroup v2 per environment
// when the cgroup filesystem is writable. Node spawns synchronously on its one JS thread, so
// the plugin moves itself into the environment's cgroup, spawns, and moves back: the child
// is born contained and cannot fork out first. Otherwise (and in addition) Remove ends every
// process started after the environment that works inside or names its directory.

class Cgroups {
  constructor(root) {
    this.base = null;
    try {
      const line = fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')
        .find((l) => (l.split(' - ')[1] || '').startsWith('cgroup2 '));
      const own = fs.readFileSync('/proc/self/cgroup', 'utf8').split('\n')
        .find((l) => l.startsWith('0::'));
      if (!line || own === undefined) return;
      const mount = line.split(' - ')[0].split(' ')[4];
      this.home = path.join(mount, own.slice(3).trim());
      const tag = crypto.createHash('sha256').update(root).digest('hex').slice(0, 16);
      const base = path.join(this.home, `kiln-node-${tag}`);
      fs.mkdirSync(base, { recursive: true });
      const probe = path.join(base, `probe-${process.pid}`);
      fs.mkdirSync(probe);
      fs.rmdirSync(probe);
      this.base = base;
    } catch (e) {
      log(`no writable cgroup v2 (${e.message}): processes are found by their directory`);
    }
  }

  spawnIn(envId, envDir, spawn) {
    if (!this.base) return spawn();
    const cg = path.join(this.base, envId);
    let entered = false;
    try {
      fs.mkdirSync(cg, { recursive: true });
      fs.writeFileSync(path.join(envDir, 'cgroup'), cg);
      fs.writeFileSync(path.join(cg, 'cgroup.procs'), String(process.pid));
      entered = true;
    } catch (e) {
      log(`cannot enter the cgroup ${cg}: ${e.message}`);
    }
    try {
      return spawn();
    } finally {
      if (entered) fs.writeFileSync(path.join(this.home, 'cgroup.procs'), String(process.pid));
    }
  }

  async endAll(envId, envDir, grace) {
    const cgs = new Set();
    try {
      cgs.add(fs.readFileSync(path.join(envDir, 'cgroup'), 'utf8').trim());
    } catch (e) { /* none recorded */ }
    if (this.base) cgs.add(path.join(this.base, envId));
    for (const cg of cgs) {
      const procs = path.join(cg, 'cgroup.procs');
      if (!fs.existsSync(procs)) continue;
      const members = () => {
        try {
          return fs.readFileSync(procs, 'utf8').split('\n').filter(Boolean).map(Number);
        } catch (e) {
          return [];
        }
      };
      const freeze = path.join(cg, 'cgroup.freeze');
      let frozen = false;
      try { fs.writeFileSync(freeze, '1'); frozen = true; } catch (e) { /* old kernel */ }
      for (const pid of members()) signal(pid, 'SIGTERM');
      if (frozen) fs.writeFileSync(freeze, '0');
      const deadline = Date.now() + grace;
      while (members().length && Date.now() < deadline) await sleep(20);
      const stop = Date.now() + 5000;
      while (members().length && Date.now() < stop) {
        try { fs.writeFileSync(path.join(cg, 'cgroup.kill'), '1'); } catch (e) {
          for (const pid of members()) signal(pid, 'SIGKILL');
        }
        await sleep(20);
      }
      for (let i = 0; i < 100; i++) {
        try { fs.rmdirSync(cg); break; } catch (e) {
          if (e.code === 'ENOENT') break;
          await sleep(20);
        }
      }
    }
  }

  release() {
    if (this.base) try { fs.rmdirSync(this.base); } catch (e) { /* environments remain */ }
  }
}

function signal(pid, sig) {
  try { process.kill(pid, sig); return true; } catch (e) { return false; }
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// Processes that work inside or name `dir` (and started after `sinceMs`): §6.3 evidence.
function referencing(dir, sinceMs) {
  const out = [];
  let btime = 0;
  try {
    btime = Number(/btime (\d+)/.exec(fs.readFileSync('/proc/stat', 'utf8'))[1]);
  } catch (e) { /* no /proc */ }
  const since = Math.max(0, (sinceMs / 1000 - btime - 1) * 100);
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      const stat = fs.readFileSync(`/proc/${name}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (f[0] === 'Z' || Number(f[19]) < since) continue;
      let cwd = '';
      try { cwd = fs.readlinkSync(`/proc/${name}/cwd`); } catch (e) { /* gone */ }
      const environ = fs.readFileSync(`/proc/${name}/environ`);
      if (cwd === dir || cwd.startsWith(dir + '/') || environ.includes(dir)) out.push(Number(name));
    } catch (e) { /* gone or not ours */ }
  }
  return out;
}

async function endByEvidence(dir, sinceMs, grace) {
  const pids = referencing(dir, sinceMs);
  if (!pids.length) return;
  for (const p of pids) signal(p, 'SIGTERM');
  const deadline = Date.now() + grace;
  while (Date.now() < deadline && pids.some((p) => fs.existsSync(`/proc/${p}/cwd`))) await sleep(20);
  for (const p of pids) signal(p, 'SIGKILL');
}

// ------------------------------------------------------------------------------------------
// Exec (§5.6): a new process group, output as it comes, keepalives, exactly one Exited.

function exec(backend, call) {
  const req = call.request;
  let started = false;
  const write = (ev) => {
    if (!started) {
      call.sendMetadata(instanceMetadata());
      started = true;
    }
    return call.write(ev);
  };
  try {
    checkVersion(call);
    checkId(req.exec_id, 'exec_id');
    const meta = backend.liveEnv(req.environment_id);
    backend.checkContainer(req.container_id);
    for (const [f, on] of [
      ['tty', req.tty], ['stdin', req.stdin], ['files', (req.files || []).length],
      ['collect', (req.collect || []).length], ['timeout_ms', Number(req.timeout_ms || 0)],
    ]) {
      if (on) throw unimplemented(`${f} is not supported by this plugin (feature not declared)`, f);
    }
    if (!req.argv || req.argv.length === 0) {
      throw invalid('argv is empty: this backend has no entrypoint to run', 'argv');
    }
    const cwd = req.working_dir || meta.paths.workspace;
    if (!cwd.startsWith('/')) throw invalid(`working_dir "${cwd}" is not absolute`, 'working_dir');
    const dir = backend.dir(meta.id);
    if (backend.execs.has(req.exec_id) || backend.usedExecIds(meta.id).has(req.exec_id)) {
      throw exists(`exec id "${req.exec_id}" was used before: exec is not replayable`, 'exec_id');
    }
    fs.appendFileSync(path.join(dir, 'execs'), `${req.exec_id}\n`);
    const env = {};
    for (const v of req.env || []) env[v.name] = v.value;
    if ((req.path_prepend || []).length) {
      env.PATH = req.path_prepend.join(':') + (env.PATH ? `:${env.PATH}` : '');
    }
    const handle = { envId: meta.id, pgid: 0, done: false, exited: null };
    backend.execs.set(req.exec_id, handle);
    const t0 = Date.now();
    const fail = (code, message) => {
      write({ started: {} });
      write({ output: { stream: 2, data: Buffer.from(`kiln-node: ${message}\n`) } });
      write({ exited: { exit_code: code, duration_ms: Date.now() - t0 } });
      handle.done = true;
      call.end();
    };
    if (!fs.existsSync(cwd) || !fs.statSync(cwd).isDirectory()) {
      return fail(127, `working directory ${cwd} does not exist`);
    }
    let child;
    try {
      child = backend.cgroups.spawnIn(meta.id, dir, () =>
        childProcess.spawn(req.argv[0], req.argv.slice(1), {
          argv0: req.argv[0], cwd, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'],
        }));
    } catch (e) {
      return fail(e.code === 'EACCES' ? 126 : 127, `${req.argv[0]}: ${e.message}`);
    }
    let ended = false;
    let quietTimer = null;
    let lastFrame = Date.now();
    const keepalive = setInterval(() => {
      if (!ended && Date.now() - lastFrame >= KEEPALIVE_MS) {
        lastFrame = Date.now();
        write({ keepalive: {} });
      }
    }, 1000);
    const finish = (status) => {
      if (ended) return;
      ended = true;
      clearInterval(keepalive);
      write({ exited: { ...status, duration_ms: handle.exitedAt - t0 } });
      call.end();
    };
    const onData = (stream) => (data) => {
      if (ended) return; // background processes: read and discard
      lastFrame = Date.now();
      for (let i = 0; i < data.length; i += 65536) {
        if (!write({ output: { stream, data: data.subarray(i, i + 65536) } })) {
          child.stdout.pause();
          child.stderr.pause();
          call.once('drain', () => { child.stdout.resume(); child.stderr.resume(); });
        }
      }
      if (handle.done) armDrain();
    };
    let drainCap = null;
    const armDrain = () => {
      if (quietTimer) clearTimeout(quietTimer);
      quietTimer = setTimeout(() => finish(handle.exited), 100);
    };
    child.stdout.on('data', onData(1));
    child.stderr.on('data', onData(2));
    let closed = 0;
    const onClose = () => { if (++closed === 2 && handle.done) finish(handle.exited); };
    child.stdout.on('close', onClose);
    child.stderr.on('close', onClose);
    child.on('error', (e) => {
      if (handle.pgid) return;
      clearInterval(keepalive);
      ended = true;
      fail(e.code === 'EACCES' ? 126 : 127, `${req.argv[0]}: ${e.code === 'ENOENT' ? 'command not found' : e.message}`);
    });
    child.on('spawn', () => {
      handle.pgid = child.pid;
      fs.appendFileSync(path.join(dir, 'pgids'), `${child.pid}\n`);
      write({ started: {} });
    });
    child.on('exit', (code, sig) => {
      if (!handle.pgid) return;
      handle.done = true;
      handle.exitedAt = Date.now();
      handle.exited = sig ? { signal: os.constants.signals[sig] } : { exit_code: code };
      if (closed === 2) return finish(handle.exited);
      drainCap = setTimeout(() => finish(handle.exited), 500);
      armDrain();
    });
    call.on('cancelled', () => {
      if (ended) return;
      ended = true;
      clearInterval(keepalive);
      if (drainCap) clearTimeout(drainCap);
      killSequence(handle, req.grace_ms || DEFAULT_GRACE_MS, true);
    });
  } catch (e) {
    call.emit('error', toStatus(e));
  }
}

/// SIGTERM to the group, the grace, SIGKILL (to the group when `all`, else only while the
/// main process runs: §5.6.7 vs §5.7).
function killSequence(handle, grace, all) {
  signal(-handle.pgid, 'SIGTERM');
  setTimeout(() => {
    if (!handle.done || all) signal(-handle.pgid, 'SIGKILL');
  }, grace);
}

function signalExec(backend, req) {
  checkId(req.exec_id, 'exec_id');
  const h = backend.execs.get(req.exec_id);
  if (!h) {
    for (const name of fs.readdirSync(backend.root)) {
      if (ID_RE.test(name) && backend.usedExecIds(name).has(req.exec_id)) return { delivered: false };
    }
    throw notFound(`exec "${req.exec_id}" does not exist`, 'exec_id');
  }
  const name = Object.keys(os.constants.signals).find((k) => os.constants.signals[k] === req.signal);
  if (!name) throw invalid(`${req.signal} is not a signal number`, 'signal');
  if (h.done || !h.pgid || !signal(-h.pgid, name)) return { delivered: false };
  if (name !== 'SIGKILL') {
    setTimeout(() => { if (!h.done) signal(-h.pgid, 'SIGKILL'); }, req.grace_ms || DEFAULT_GRACE_MS);
  }
  return { delivered: true };
}

// ------------------------------------------------------------------------------------------
// Copies (§5.9–5.11): tar in, tar out, inside the environment's directory.

function inside(backend, meta, p, name) {
  if (!p || !p.startsWith('/')) throw invalid(`${name} "${p}" is not an absolute path`, name);
  if (p.split('/').includes('..')) throw invalid(`${name} "${p}" contains '..'`, name);
  const dir = backend.dir(meta.id);
  let real = p;
  try { real = fs.realpathSync(p); } catch (e) {
    try { real = path.join(fs.realpathSync(path.dirname(p)), path.basename(p)); } catch (e2) { /* missing */ }
  }
  if (real !== dir && !real.startsWith(dir + '/')) {
    throw denied(`${name} "${p}" is outside the environment's directory ${dir}`, name);
  }
  return p;
}

function copyIn(backend, call, callback) {
  let header = null;
  const chunks = [];
  let failed = null;
  call.on('data', (c) => {
    if (failed) return;
    if (!header) {
      if (!c.header) { failed = invalid('the first CopyIn frame must be the header', 'header'); return; }
      header = c.header;
    } else if (c.header) {
      failed = invalid('only data frames may follow the header', 'data');
    } else {
      chunks.push(c.data);
    }
  });
  call.on('end', () => {
    try {
      if (failed) throw failed;
      checkVersion(call);
      if (!header) throw invalid('the first CopyIn frame must be the header', 'header');
      const meta = backend.liveEnv(header.environment_id);
      backend.checkContainer(header.container_id);
      if (header.local_path) throw unimplemented('local_path needs feature local_copy', 'local_path');
      const dest = inside(backend, meta, header.dest_path, 'dest_path');
      const stats = tar.unpack(Buffer.concat(chunks), dest);
      call.sendMetadata(instanceMetadata());
      callback(null, stats);
    } catch (e) {
      callback(toStatus(e instanceof tar.ArchiveError ? invalid(e.message, 'data') : e));
    }
  });
}

function copyOut(backend, call) {
  try {
    checkVersion(call);
    const req = call.request;
    const meta = backend.liveEnv(req.environment_id);
    backend.checkContainer(req.container_id);
    const p = inside(backend, meta, req.path, 'path');
    try { fs.lstatSync(p); } catch (e) { throw notFound(`${req.path} does not exist`, 'path'); }
    const data = tar.pack(p);
    call.sendMetadata(instanceMetadata());
    for (let i = 0; i < data.length; i += CHUNK) call.write({ data: data.subarray(i, i + CHUNK) });
    call.end();
  } catch (e) {
    call.emit('error', toStatus(e));
  }
}

// ------------------------------------------------------------------------------------------
// The server: flags, health, shutdown.

function parseArgs(argv) {
  const a = { listen: process.env.KILN_PLUGIN_LISTEN, root: null, exitOnStdinEof: false };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k === '--listen') a.listen = argv[++i];
    else if (k === '--root') a.root = argv[++i];
    else if (k === '--exit-on-stdin-eof') a.exitOnStdinEof = true;
    else throw new Error(`unknown flag ${k}: use --listen unix:///PATH, --root DIR, --exit-on-stdin-eof`);
  }
  if (!a.listen) throw new Error('--listen unix:///PATH is required');
  a.root = a.root || path.join(os.tmpdir(), `kiln-node-${process.getuid()}`);
  return a;
}

function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    log(e.message);
    process.exit(2);
  }
  const load = (file) => grpc.loadPackageDefinition(protoLoader.loadSync(file, {
    includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, enums: Number, defaults: true, oneofs: true,
  }));
  const kiln = load('backend/v1/backend.proto').kiln.backend.v1;
  const health = load('grpc/health/v1/health.proto').grpc.health.v1;
  const backend = new Backend(args.root);
  const server = new grpc.Server({
    'grpc.max_receive_message_length': MAX_MESSAGE,
    'grpc.max_send_message_length': MAX_MESSAGE,
  });
  const refuse = (what, f) => unary(() => { throw unimplemented(`${what}: no container layer is declared`, f); });
  server.addService(kiln.Backend.service, {
    Capabilities: unary((r) => backend.capabilities(r), false),
    CreateExecutionEnvironment: unary((r) => backend.create(r)),
    CreateJobContainer: refuse('job containers'),
    CreateServiceContainer: refuse('service containers'),
    CreateStepContainer: refuse('step containers'),
    StartContainer: refuse('containers'),
    Inspect: unary((r) => backend.inspect(r)),
    Exec: (call) => exec(backend, call),
    SignalExec: unary((r) => signalExec(backend, r)),
    WriteStdin: (call, callback) => {
      call.on('data', () => {});
      callback(toStatus(unimplemented('stdin is not supported by this plugin (feature not declared)', 'stdin')));
    },
    CopyIn: (call, callback) => copyIn(backend, call, callback),
    CopyOut: (call) => copyOut(backend, call),
    Remove: unary((r) => backend.remove(r)),
    ListEnvironments: unary((r) => backend.list(r)),
  });
  const SERVING = 1;
  server.addService(health.Health.service, {
    Check: (call, callback) => {
      if (call.request.service === '' || call.request.service === SERVICE) {
        callback(null, { status: SERVING });
      } else {
        callback({ code: S.NOT_FOUND, details: `unknown service ${call.request.service}` });
      }
    },
    Watch: (call) => call.write({ status: SERVING }),
  });
  const socket = args.listen.replace(/^unix:\/\//, '');
  if (!socket.startsWith('/')) {
    log(`--listen ${args.listen}: this example serves unix sockets only`);
    process.exit(2);
  }
  fs.rmSync(socket, { force: true });
  process.umask(0o077); // the socket is created 0600
  server.bindAsync(`unix://${socket}`, grpc.ServerCredentials.createInsecure(), (err) => {
    if (err) {
      log(`binding ${socket}: ${err.message}`);
      process.exit(2);
    }
    fs.chmodSync(socket, 0o600);
    log(`serving on ${socket} (root ${backend.root}, instance ${INSTANCE_ID})`);
  });
  let stopping = false;
  const stop = (why) => {
    if (stopping) return;
    stopping = true;
    log(`shutting down: ${why}`);
    const force = setTimeout(() => server.forceShutdown(), 2000);
    server.tryShutdown(() => {
      clearTimeout(force);
      backend.cgroups.release();
      fs.rmSync(socket, { force: true });
      process.exit(0);
    });
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  if (args.exitOnStdinEof) {
    process.stdin.on('end', () => stop('stdin closed'));
    process.stdin.on('error', () => stop('stdin closed'));
    process.stdin.resume();
  }
}

main();
