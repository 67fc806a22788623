# One scripted nbdsh session per export URI, run by `cargo xtask
# conformance` inside nbdsh (with sys.argv = [script, URI, RO_URI?]); plain
# `/usr/bin/python3 nbdsh_session.py URI [RO_URI]` runs it the same way.
#
# Every check prints "ok <clause>: <what>" or "FAIL <clause>: <what>: <why>"
# and the script exits 1 if any failed. Clauses name sections of the NBD
# spec (NetworkBlockDevice/nbd doc/proto.md). Strict mode is switched off
# where a check must put a request on the wire that a polite client would
# refuse to send, so the server's own answer is what is tested.
import errno
import sys

import nbd

failed = 0


def check(clause, what, fn):
    global failed
    try:
        fn()
        print(f"ok {clause}: {what}")
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        failed += 1
        print(f"FAIL {clause}: {what}: {e!r}")


def expect_errno(want, fn):
    try:
        fn()
    except nbd.Error as e:
        # libnbd gives the errno's name ("EINVAL"), older builds its number.
        got = getattr(errno, e.errno) if isinstance(e.errno, str) else e.errno
        if got != want:
            raise AssertionError(f"{e.errno} ({e.string}), want {errno.errorcode[want]}")
        return
    raise AssertionError(f"succeeded, want {errno.errorcode[want]}")


def connect(uri, strict=True):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    if not strict:
        h.set_strict_mode(0)
    return h


uri = sys.argv[1]
ro_uri = sys.argv[2] if len(sys.argv) > 2 else None
h = connect(uri)
size = h.get_size()
bmin = h.get_block_size(nbd.SIZE_MINIMUM) or 1
bmax = h.get_block_size(nbd.SIZE_MAXIMUM) or (32 << 20)
base = 4 << 20  # clear of anything other checks wrote


def flags_are_consistent():
    assert size > 0 and size % bmin == 0, f"size {size} vs min block {bmin}"
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.can_multi_conn(), "FLUSH covers every connection: multi-conn"
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context("base:allocation")


check("Transmission flags / NBD_OPT_GO", "export size, flags, block sizes, structured replies, base:allocation", flags_are_consistent)


def read_write_roundtrip():
    data = bytes((i * 7 + 3) % 251 for i in range(65536))
    h.pwrite(data, base, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), base) == data
    h.flush()
    assert h.pread(len(data), base) == data


check("NBD_CMD_WRITE / NBD_CMD_READ / NBD_CMD_FLAG_FUA", "write with FUA, read back, flush", read_write_roundtrip)


def trim_and_zero():
    h.pwrite(b"\xaa" * 65536, base + (1 << 20))
    h.zero(65536, base + (1 << 20))
    assert h.pread(65536, base + (1 << 20)) == bytes(65536)
    h.pwrite(b"\xbb" * 65536, base + (1 << 20))
    h.zero(65536, base + (1 << 20), nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(65536, base + (1 << 20)) == bytes(65536)
    h.trim(65536, base + (1 << 20))
    h.cache(65536, base)


check("NBD_CMD_WRITE_ZEROES / NBD_CMD_TRIM / NBD_CMD_CACHE", "zeroes (with and without NO_HOLE), trim, cache", trim_and_zero)


def fast_zero():
    if h.can_fast_zero():
        # Either done, or ENOTSUP at once: both are what the spec allows.
        try:
            h.zero(65536, base + (2 << 20), nbd.CMD_FLAG_FAST_ZERO)
            assert h.pread(65536, base + (2 << 20)) == bytes(65536)
        except nbd.Error as e:
            assert e.errno in ("ENOTSUP", "EOPNOTSUPP", errno.ENOTSUP), e
    else:
        raw = connect(uri, strict=False)
        expect_errno(errno.EINVAL, lambda: raw.zero(65536, base, nbd.CMD_FLAG_FAST_ZERO))
        raw.shutdown()


check("NBD_CMD_FLAG_FAST_ZERO", "honoured when advertised, EINVAL when not", fast_zero)


def block_status():
    got = []

    def cb(context, offset, entries, err):
        assert context == "base:allocation", context
        got.append((offset, list(entries)))
        return 0

    h.block_status(1 << 20, base, cb)
    assert len(got) == 1, got
    entries = got[0][1]
    assert len(entries) >= 2 and len(entries) % 2 == 0
    lengths = entries[0::2]
    assert all(n > 0 for n in lengths) and sum(lengths) <= 1 << 20, entries
    # The first 64 KiB were written above: never reported as a zero hole.
    assert entries[1] & 3 != 3, entries
    got.clear()
    h.block_status(1 << 20, base, cb, nbd.CMD_FLAG_REQ_ONE)
    assert len(got[0][1]) == 2, got


check("NBD_CMD_BLOCK_STATUS / base:allocation / REQ_ONE", "extents cover the request, written data is not a hole", block_status)


def out_of_range():
    raw = connect(uri, strict=False)
    expect_errno(errno.EINVAL, lambda: raw.pread(4096, size))
    expect_errno(errno.ENOSPC, lambda: raw.pwrite(bytes(4096), size))
    expect_errno(errno.EINVAL, lambda: raw.trim(4096, size))
    # The connection survives every error.
    assert raw.pread(512, 0) is not None
    raw.shutdown()


check("Error values: EINVAL / ENOSPC past the end", "reads and trims past the end are EINVAL, writes ENOSPC; connection survives", out_of_range)


def bad_flags_and_alignment():
    raw = connect(uri, strict=False)
    # REQ_ONE is only valid on BLOCK_STATUS.
    expect_errno(errno.EINVAL, lambda: raw.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
    if bmin > 1:
        expect_errno(errno.EINVAL, lambda: raw.pread(bmin, 1))
    expect_errno(errno.EINVAL, lambda: raw.pread(bmax + bmin, 0))
    assert raw.pread(512, 0) is not None
    raw.shutdown()


check("Error values: unknown or inapplicable flags, block size constraints", "EINVAL, connection survives", bad_flags_and_alignment)


def wait_all(cookies):
    # A completed command is retired the first time it reports done.
    pending = set(cookies)
    while pending:
        pending = {c for c in pending if not h.aio_command_completed(c)}
        if pending:
            h.poll(-1)


def many_in_flight():
    wait_all([h.aio_pwrite(bytes([i]) * 4096, base + (3 << 20) + i * 4096) for i in range(64)])
    bufs = [nbd.Buffer(4096) for _ in range(64)]
    wait_all([h.aio_pread(b, base + (3 << 20) + i * 4096) for i, b in enumerate(bufs)])
    for i, b in enumerate(bufs):
        assert b.to_bytearray() == bytes([i]) * 4096, f"block {i}"


check("Transmission: out-of-order replies", "64 writes and 64 reads in flight at once", many_in_flight)


def opt_mode():
    o = nbd.NBD()
    o.set_opt_mode(True)
    o.connect_uri(uri)
    names = []
    o.opt_list(lambda name, desc: names.append(name) or 0)
    assert o.get_export_name() in names or not o.get_export_name(), names
    contexts = []
    o.opt_list_meta_context(lambda name: contexts.append(name) or 0)
    assert contexts == ["base:allocation"], contexts
    o.opt_info()
    assert o.get_size() == size
    o.opt_abort()


check("NBD_OPT_LIST / NBD_OPT_LIST_META_CONTEXT / NBD_OPT_INFO / NBD_OPT_ABORT", "option haggling in opt mode", opt_mode)


if ro_uri:
    def read_only():
        r = connect(ro_uri, strict=False)
        assert r.is_read_only()
        expect_errno(errno.EPERM, lambda: r.pwrite(bytes(4096), 0))
        expect_errno(errno.EPERM, lambda: r.trim(4096, 0))
        expect_errno(errno.EPERM, lambda: r.zero(4096, 0))
        r.pread(4096, 0)
        r.shutdown()

    check("NBD_FLAG_READ_ONLY / EPERM", "writes, trims and zeroes refused with EPERM", read_only)

h.shutdown()
check("NBD_CMD_DISC", "soft disconnect after all replies", lambda: None)
sys.exit(1 if failed else 0)
