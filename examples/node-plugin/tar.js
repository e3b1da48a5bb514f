// Tar archives with the protocol's archive rules (proto/backend/v1/README.md §5.11), for
// CopyIn and CopyOut. ustar, GNU long names (L, K) and pax path/linkpath records are read;
// archives are written as ustar with GNU long-name entries.
//
// Extraction refuses absolute names and `..` components, writes through a symlink in a
// parent position, and hard links whose target is not a relative path inside the
// destination; a symlink at an entry's own path is replaced, never followed. Permission bits
// are kept (directories get theirs last); symlinks keep their target verbatim; device nodes
// are never created and FIFOs are skipped. Extraction stops at the first refused entry.
'use strict';

const fs = require('fs');
const path = require('path');

class ArchiveError extends Error {}

const BLOCK = 512;

function str(buf, off, len) {
  const s = buf.subarray(off, off + len);
  const nul = s.indexOf(0);
  return s.subarray(0, nul < 0 ? len : nul).toString('utf8');
}

function octal(buf, off, len) {
  if (buf[off] & 0x80) {
    let n = 0;
    for (let i = off + 1; i < off + len; i++) n = n * 256 + buf[i];
    return n;
  }
  const s = str(buf, off, len).trim();
  return s ? parseInt(s, 8) : 0;
}

function checksumOk(h) {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : h[i];
  return sum === octal(h, 148, 8);
}

/// The entries of an archive: {name, type, mode, link, data}.
function* entries(buf) {
  let off = 0;
  let longName = null;
  let longLink = null;
  let pax = {};
  while (off + BLOCK <= buf.length) {
    const h = buf.subarray(off, off + BLOCK);
    if (h.every((b) => b === 0)) return;
    if (!checksumOk(h)) throw new ArchiveError(`corrupt tar header at byte ${off}`);
    const size = octal(h, 124, 12);
    const type = String.fromCharCode(h[156] || 48);
    const start = off + BLOCK;
    if (start + size > buf.length) throw new ArchiveError('truncated tar archive');
    const data = buf.subarray(start, start + size);
    off = start + Math.ceil(size / BLOCK) * BLOCK;
    if (type === 'L') { longName = str(data, 0, data.length); continue; }
    if (type === 'K') { longLink = str(data, 0, data.length); continue; }
    if (type === 'x') {
      let rest = data.toString('utf8');
      while (rest.length) {
        const sp = rest.indexOf(' ');
        const n = parseInt(rest.slice(0, sp), 10);
        if (!(n > 0)) break;
        const rec = rest.slice(sp + 1, n - 1);
        const eq = rec.indexOf('=');
        pax[rec.slice(0, eq)] = rec.slice(eq + 1);
        rest = rest.slice(n);
      }
      continue;
    }
    if (type === 'g') continue;
    let name = str(h, 0, 100);
    if (str(h, 257, 5) === 'ustar') {
      const prefix = str(h, 345, 155);
      if (prefix) name = `${prefix}/${name}`;
    }
    name = pax.path || longName || name;
    const link = pax.linkpath || longLink || str(h, 157, 100);
    longName = longLink = null;
    pax = {};
    yield { name, type, mode: octal(h, 100, 8) & 0o7777, link, data };
  }
}

function relative(name) {
  if (name.startsWith('/')) {
    throw new ArchiveError(`tar entry "${name}" is absolute: entries must be relative to the destination`);
  }
  const parts = [];
  for (const p of name.split('/')) {
    if (p === '' || p === '.') continue;
    if (p === '..') {
      throw new ArchiveError(`tar entry "${name}" contains '..': entries must stay inside the destination`);
    }
    parts.push(p);
  }
  return parts;
}

function lstat(p) {
  try { return fs.lstatSync(p); } catch (e) { if (e.code === 'ENOENT') return null; throw e; }
}

function parents(dest, parts, name) {
  let cur = dest;
  for (const p of parts.slice(0, -1)) {
    cur = path.join(cur, p);
    const st = lstat(cur);
    if (!st) { fs.mkdirSync(cur, { mode: 0o755 }); continue; }
    if (st.isSymbolicLink()) {
      throw new ArchiveError(`tar entry "${name}" would be written through the symlink "${path.relative(dest, cur)}": writes through symlinks are refused`);
    }
    if (!st.isDirectory()) throw new ArchiveError(`tar entry "${name}": "${cur}" is not a directory`);
  }
}

/// Removes a non-directory at `p` (never following it); true when a directory is there.
function clear(p) {
  const st = lstat(p);
  if (!st) return false;
  if (st.isDirectory()) return true;
  fs.unlinkSync(p);
  return false;
}

function unpack(buf, dest) {
  fs.mkdirSync(dest, { recursive: true });
  let count = 0;
  let bytes = 0;
  const dirModes = [];
  try {
    for (const e of entries(buf)) {
      const parts = relative(e.name);
      if (!parts.length) continue;
      if (e.type === '1') relative(e.link);
      parents(dest, parts, e.name);
      const p = path.join(dest, ...parts);
      if (e.type === '5') {
        if (!clear(p)) fs.mkdirSync(p, { mode: 0o700 });
        dirModes.push([p, e.mode]);
      } else if (e.type === '0' || e.type === '7' || e.type === '\0') {
        if (clear(p)) throw new ArchiveError(`tar entry "${e.name}" is a file where the destination has a directory`);
        const fd = fs.openSync(p, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC | fs.constants.O_NOFOLLOW, 0o600);
        try { fs.writeSync(fd, e.data); fs.fchmodSync(fd, e.mode); } finally { fs.closeSync(fd); }
        bytes += e.data.length;
      } else if (e.type === '2') {
        if (clear(p)) throw new ArchiveError(`tar entry "${e.name}" is a symlink where the destination has a directory`);
        fs.symlinkSync(e.link, p);
      } else if (e.type === '1') {
        if (clear(p)) throw new ArchiveError(`tar entry "${e.name}" is a hard link where the destination has a directory`);
        fs.linkSync(path.join(dest, ...relative(e.link)), p);
      } else {
        continue; // devices are never created; FIFOs are skipped
      }
      count++;
    }
  } finally {
    for (const [p, mode] of dirModes.reverse()) {
      try { fs.chmodSync(p, mode); } catch (e) { /* removed meanwhile */ }
    }
  }
  return { entries: count, bytes };
}

function header(name, type, mode, size, link, mtime) {
  const h = Buffer.alloc(BLOCK);
  h.write(name.slice(0, 99), 0);
  h.write(`${(mode & 0o7777).toString(8).padStart(7, '0')}\0`, 100);
  h.write('0000000\0', 108);
  h.write('0000000\0', 116);
  h.write(`${size.toString(8).padStart(11, '0')}\0`, 124);
  h.write(`${Math.floor(mtime).toString(8).padStart(11, '0')}\0`, 136);
  h.write('        ', 148);
  h.write(type, 156);
  h.write(link.slice(0, 99), 157);
  h.write('ustar\0', 257);
  h.write('00', 263);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148);
  return h;
}

function pad(n) {
  return Buffer.alloc((BLOCK - (n % BLOCK)) % BLOCK);
}

/// `p` as a tar archive holding it under its base name; symlinks stored as links.
function pack(p) {
  const out = [];
  const add = (full, name) => {
    const st = fs.lstatSync(full);
    const type = st.isSymbolicLink() ? '2' : st.isDirectory() ? '5' : st.isFile() ? '0' : null;
    if (!type) return; // sockets, FIFOs, devices
    const link = type === '2' ? fs.readlinkSync(full) : '';
    const entryName = type === '5' ? `${name}/` : name;
    const long = (kind, value) => {
      const data = Buffer.from(`${value}\0`);
      out.push(header('././@LongLink', kind, 0o644, data.length, '', 0), data, pad(data.length));
    };
    if (Buffer.byteLength(entryName) > 99) long('L', entryName);
    if (Buffer.byteLength(link) > 99) long('K', link);
    const data = type === '0' ? fs.readFileSync(full) : Buffer.alloc(0);
    out.push(header(entryName, type, st.mode, data.length, link, st.mtimeMs / 1000), data, pad(data.length));
    if (type === '5') {
      for (const child of fs.readdirSync(full).sort()) add(path.join(full, child), `${name}/${child}`);
    }
  };
  add(p, path.basename(p.replace(/\/+$/, '')) || '.');
  out.push(Buffer.alloc(2 * BLOCK));
  return Buffer.concat(out);
}

module.exports = { ArchiveError, pack, unpack };
