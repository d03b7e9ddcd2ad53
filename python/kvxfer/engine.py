"""`TransferEngine`: the method set of `mooncake.engine.TransferEngine` on a kvxfer engine.

SGLang's PD disaggregation (disaggregation/mooncake/conn.py through
distributed/device_communicators/mooncake_transfer_engine.py) drives a Mooncake
transfer engine by these calls; this class answers them with the same names, arguments
and return conventions, so python/compat/mooncake/engine.py can stand in for Mooncake:

- setup, registration and transfers return 0 on success and a negative int on failure
  (here the kvx_status code, e.g. -5 KVX_ERR_NOT_REGISTERED); the reason is logged on
  the "kvxfer.engine" logger and kept for `last_error()`, because Mooncake's callers only
  test the sign;
- `batch_transfer_async_*` return a batch id, 0 on failure; `get_batch_transfer_status`
  waits for the batches and returns 0 if all moved every byte, -1 otherwise;
- `get_notifies()` returns a list of `TransferNotify` (name, msg).

Sessions are "host:port" as in Mooncake's P2PHANDSHAKE mode: the engine listens on
`local_hostname` (a free port unless it carries one) and `get_rpc_port()` is that port,
so SGLang's `f"{hostname}:{get_rpc_port()}"` is what peers open it by. There is no
metadata server: any other `metadata_server` is refused with a clear log line.
"""

from __future__ import annotations

import ctypes
import enum
import json
import logging
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from . import _lib as L
from .core import Buffer, Engine, KvxError, _error

logger = logging.getLogger("kvxfer.engine")

# Mooncake's "no metadata server, peers exchange descriptors directly" mode, which is the
# only way kvxfer works (sessions are opened by host:port).
P2P_METADATA = "P2PHANDSHAKE"

# Mooncake protocol -> kvxfer transports, in order of preference. Same-host shared
# memory stays first in both: it is what a same-host Mooncake peer would use over
# NVLink/shm anyway, and falls back by itself when the peer is elsewhere.
PROTOCOL_TRANSPORTS = {
    "tcp": "shm,tcp",
    "rdma": "shm,rdma,tcp",
}


class TransferOpcode(enum.IntEnum):
    """Mooncake's opcodes for transfer_sync / batch_transfer_sync."""

    READ = 0
    WRITE = 1


class TransferNotify:
    """A notification delivered with a transfer (Mooncake's TransferNotify): `name` and
    `msg`. On the wire it is the JSON object {"name": ..., "msg": ...}; a payload from a
    plain kvxfer sender that is not such an object arrives with `name` = the sender's
    session and `msg` = the payload as text."""

    def __init__(self, name: str = "", msg: str = ""):
        self.name = name
        self.msg = msg

    def encode(self) -> bytes:
        return json.dumps({"name": self.name, "msg": self.msg}).encode()

    @classmethod
    def decode(cls, sender: str, payload: bytes) -> "TransferNotify":
        try:
            obj = json.loads(payload)
            if isinstance(obj, dict) and set(obj) == {"name", "msg"}:
                return cls(str(obj["name"]), str(obj["msg"]))
        except ValueError:
            pass
        return cls(sender, payload.decode(errors="replace"))

    def __repr__(self) -> str:
        return f"TransferNotify(name={self.name!r}, msg={self.msg!r})"


def _split_hostname(local_hostname: str) -> Tuple[str, int]:
    """"host", "host:port", "[v6]" or "[v6]:port" -> (host, port); port 0 = pick one."""
    s = local_hostname.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else 0
    if s.count(":") == 1:
        host, port = s.split(":")
        if port.isdigit():
            return host, int(port)
    return s, 0


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TransferEngine:
    """A Mooncake-compatible transfer engine backed by a kvxfer `Engine`."""

    def __init__(self) -> None:
        self._engine: Optional[Engine] = None
        self._peers: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._managed: Dict[int, Buffer] = {}
        self._errors = threading.local()

    # -- failures --------------------------------------------------------------------

    def _fail(self, call: str, err: Exception, code: Optional[int] = None) -> int:
        # Mooncake's callers only look at the sign of the result: keep the reason where a
        # person (the log) and a test (last_error) can read it.
        self._errors.last = err
        logger.warning("kvxfer TransferEngine.%s failed: %s", call, err)
        if code is not None:
            return code
        return err.status if isinstance(err, KvxError) and err.status < 0 else -1

    def last_error(self) -> Optional[Exception]:
        """The exception behind this thread's last failed call (None if none failed)."""
        return getattr(self._errors, "last", None)

    def _require(self, call: str) -> Engine:
        engine = self._engine
        if engine is None:
            raise _error(L.ERR_INVALID_ARGUMENT, "the engine is not initialized (call initialize first)", call)
        return engine

    # -- setup -----------------------------------------------------------------------

    def initialize(self, local_hostname: str, metadata_server: str, protocol: str, device_name: str) -> int:
        """Starts the engine listening on `local_hostname` ("host" or "host:port").
        Returns 0, or a negative int (the reason is logged)."""
        try:
            if self._engine is not None:
                raise _error(L.ERR_INVALID_ARGUMENT, "already initialized", "initialize")
            if (metadata_server or "").strip().upper() != P2P_METADATA:
                raise _error(
                    L.ERR_CONFIG,
                    f"metadata server {metadata_server!r} is not supported: kvxfer engines "
                    f"exchange descriptors directly; use {P2P_METADATA!r}",
                    "initialize",
                )
            proto = (protocol or "").strip().lower()
            if proto not in PROTOCOL_TRANSPORTS:
                raise _error(
                    L.ERR_CONFIG,
                    f"protocol {protocol!r} is not supported; use one of {sorted(PROTOCOL_TRANSPORTS)}",
                    "initialize",
                )
            host, port = _split_hostname(local_hostname)
            if not host:
                raise _error(L.ERR_INVALID_ARGUMENT, f"local_hostname {local_hostname!r} has no host", "initialize")
            devices = ((device_name or "").strip() or None) if proto == "rdma" else None
            self._engine = Engine(
                listen=_listen_address(host, port),
                transports=PROTOCOL_TRANSPORTS[proto],
                rdma_devices=devices,
            )
            return 0
        except Exception as e:  # noqa: BLE001 - Mooncake returns a code for any failure
            return self._fail("initialize", e)

    def initialize_ext(self, local_hostname: str, metadata_server: str, protocol: str, device_name: str,
                       metadata_type: str) -> int:
        """initialize() with Mooncake's metadata type ("p2p" is the only one kvxfer has)."""
        if metadata_type and metadata_type.lower() not in ("p2p", "p2phandshake"):
            return self._fail("initialize_ext", _error(
                L.ERR_CONFIG, f"metadata type {metadata_type!r} is not supported; use 'p2p'", "initialize_ext"))
        return self.initialize(local_hostname, metadata_server, protocol, device_name)

    def get_rpc_port(self) -> int:
        """The port peers reach this engine at (the port of its session id)."""
        session = self._require("get_rpc_port").session_id
        return int(session.rsplit(":", 1)[1])

    def get_session_id(self) -> str:
        """This engine's session id ("host:port"), as peers name it."""
        return self._require("get_session_id").session_id

    def get_engine(self) -> Engine:
        """The kvxfer Engine inside (Mooncake returns its inner engine here)."""
        return self._require("get_engine")

    def close(self) -> None:
        """Stops the engine (not in Mooncake's API, where the process exit does it)."""
        with self._lock:
            engine, self._engine = self._engine, None
            self._peers.clear()
            managed, self._managed = self._managed, {}
        for buf in managed.values():
            buf.free()
        if engine is not None:
            engine.close()

    # -- memory ----------------------------------------------------------------------

    def register_memory(self, buffer_addr: int, capacity: int) -> int:
        try:
            self._require("register_memory").register(buffer_addr, capacity)
            return 0
        except Exception as e:  # noqa: BLE001
            return self._fail("register_memory", e)

    def unregister_memory(self, buffer_addr: int) -> int:
        try:
            self._require("unregister_memory").unregister(buffer_addr)
            return 0
        except Exception as e:  # noqa: BLE001
            return self._fail("unregister_memory", e)

    def batch_register_memory(self, buffer_addresses: Sequence[int], capacities: Sequence[int]) -> int:
        """Registers every region or none (kvx_register_batch); 0 or negative."""
        try:
            if len(buffer_addresses) != len(capacities):
                raise _error(L.ERR_INVALID_ARGUMENT,
                             f"{len(buffer_addresses)} addresses but {len(capacities)} capacities",
                             "batch_register_memory")
            self._require("batch_register_memory").register_batch(list(zip(buffer_addresses, capacities)))
            return 0
        except Exception as e:  # noqa: BLE001
            return self._fail("batch_register_memory", e)

    def batch_unregister_memory(self, buffer_addresses: Sequence[int]) -> int:
        """Unregisters each region; 0 if all were, else the first failure (the others
        are still unregistered)."""
        engine = None
        try:
            engine = self._require("batch_unregister_memory")
        except Exception as e:  # noqa: BLE001
            return self._fail("batch_unregister_memory", e)
        result = 0
        for addr in buffer_addresses:
            try:
                engine.unregister(addr)
            except Exception as e:  # noqa: BLE001
                code = self._fail("batch_unregister_memory", e)
                result = result or code
        return result

    def allocate_managed_buffer(self, length: int) -> int:
        """Registered memory the engine owns; its address, or 0 on failure."""
        try:
            buf = self._require("allocate_managed_buffer").allocate(length)
            with self._lock:
                self._managed[buf.addr] = buf
            return buf.addr
        except Exception as e:  # noqa: BLE001
            return self._fail("allocate_managed_buffer", e, code=0)

    def free_managed_buffer(self, buffer_addr: int, length: int) -> int:
        with self._lock:
            buf = self._managed.pop(buffer_addr, None)
        if buf is None or buf.len != length:
            if buf is not None:
                with self._lock:
                    self._managed[buffer_addr] = buf
            return self._fail("free_managed_buffer", _error(
                L.ERR_INVALID_ARGUMENT, f"no managed buffer of {length} bytes at {buffer_addr:#x}",
                "free_managed_buffer"))
        buf.free()
        return 0

    def write_bytes_to_buffer(self, dest_address: int, src_ptr: bytes, length: int) -> int:
        """Copies `length` bytes of `src_ptr` to `dest_address` (a managed buffer)."""
        if length > len(src_ptr) or not self._in_managed(dest_address, length):
            return self._fail("write_bytes_to_buffer", _error(
                L.ERR_INVALID_ARGUMENT, f"{length} bytes at {dest_address:#x} is not inside a managed buffer "
                f"or exceeds the {len(src_ptr)} bytes given", "write_bytes_to_buffer"))
        ctypes.memmove(dest_address, src_ptr, length)
        return 0

    def read_bytes_from_buffer(self, source_address: int, length: int) -> bytes:
        if not self._in_managed(source_address, length):
            raise _error(L.ERR_INVALID_ARGUMENT,
                         f"{length} bytes at {source_address:#x} is not inside a managed buffer",
                         "read_bytes_from_buffer")
        return ctypes.string_at(source_address, length)

    def _in_managed(self, addr: int, length: int) -> bool:
        # Raw pointers from Python are only dereferenced inside memory this object
        # owns, so a wrong address is an error and not a crash.
        with self._lock:
            return any(b.addr <= addr and addr + length <= b.addr + b.len for b in self._managed.values())

    def get_first_buffer_address(self, segment_name: str) -> int:
        """The lowest address `segment_name` registered; 0 if unknown or none."""
        try:
            engine = self._require("get_first_buffer_address")
            regions = engine.peer_regions(self._peer(engine, segment_name, "get_first_buffer_address"))
            return regions[0].addr if regions else 0
        except Exception as e:  # noqa: BLE001
            return self._fail("get_first_buffer_address", e, code=0)

    # -- peers -----------------------------------------------------------------------

    def _peer(self, engine: Engine, session: str, call: str) -> int:
        with self._lock:
            peer = self._peers.get(session)
        if peer is not None:
            return peer
        peer = engine.open_peer(session)  # outside the lock: it may take a connect timeout
        with self._lock:
            self._peers[session] = peer
        return peer

    def _forget_if_gone(self, session: str, err: Exception) -> None:
        # A peer id the engine no longer knows (closed) is dropped, so the next call
        # opens the session afresh, as Mooncake re-handshakes.
        if isinstance(err, KvxError) and err.status == L.ERR_UNKNOWN_PEER:
            with self._lock:
                self._peers.pop(session, None)

    def send_probe(self, peer_server_name: str) -> int:
        """0 if the peer answers (reconnecting if it went away), non-zero otherwise."""
        try:
            engine = self._require("send_probe")
            engine.probe(self._peer(engine, peer_server_name, "send_probe"))
            return 0
        except Exception as e:  # noqa: BLE001
            self._forget_if_gone(peer_server_name, e)
            return self._fail("send_probe", e)

    # -- transfers -------------------------------------------------------------------

    @staticmethod
    def _ops(kind: int, buffers: Sequence[int], peer_addresses: Sequence[int], lengths: Sequence[int]):
        if not (len(buffers) == len(peer_addresses) == len(lengths)):
            raise _error(L.ERR_INVALID_ARGUMENT,
                         f"{len(buffers)} buffers, {len(peer_addresses)} peer addresses and "
                         f"{len(lengths)} lengths", "batch transfer")
        return [(kind, b, p, n) for b, p, n in zip(buffers, peer_addresses, lengths)]

    def _sync(self, call: str, target: str, ops, notify: Optional[TransferNotify] = None) -> int:
        try:
            engine = self._require(call)
            peer = self._peer(engine, target, call)
            if not ops:
                return 0
            if notify is None:
                engine.transfer_sync(peer, ops)
                return 0
            batch = engine.submit(peer, ops, notify=notify.encode())
            try:
                st = engine.wait(batch)
            finally:
                engine.free_batch(batch)
            if st != L.OK:
                raise _error(st, f"batch {batch} to {target} ended so", call)
            return 0
        except Exception as e:  # noqa: BLE001
            self._forget_if_gone(target, e)
            return self._fail(call, e)

    def transfer_sync_write(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int,
                            transport_hint: str = "") -> int:
        return self._sync("transfer_sync_write", target_hostname, [(L.OP_WRITE, buffer, peer_buffer_address, length)])

    def transfer_sync_read(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int,
                           transport_hint: str = "") -> int:
        return self._sync("transfer_sync_read", target_hostname, [(L.OP_READ, buffer, peer_buffer_address, length)])

    def transfer_sync(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int,
                      opcode: TransferOpcode, notify: Optional[TransferNotify] = None,
                      transport_hint: str = "") -> int:
        kind = L.OP_WRITE if int(opcode) == TransferOpcode.WRITE else L.OP_READ
        return self._sync("transfer_sync", target_hostname, [(kind, buffer, peer_buffer_address, length)], notify)

    def batch_transfer_sync_write(self, target_hostname: str, buffers: Sequence[int],
                                  peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                  transport_hint: str = "") -> int:
        try:
            ops = self._ops(L.OP_WRITE, buffers, peer_buffer_addresses, lengths)
        except KvxError as e:
            return self._fail("batch_transfer_sync_write", e)
        return self._sync("batch_transfer_sync_write", target_hostname, ops)

    def batch_transfer_sync_read(self, target_hostname: str, buffers: Sequence[int],
                                 peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                 transport_hint: str = "") -> int:
        try:
            ops = self._ops(L.OP_READ, buffers, peer_buffer_addresses, lengths)
        except KvxError as e:
            return self._fail("batch_transfer_sync_read", e)
        return self._sync("batch_transfer_sync_read", target_hostname, ops)

    def batch_transfer_sync(self, target_hostname: str, buffers: Sequence[int],
                            peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                            opcode: TransferOpcode, notify: Optional[TransferNotify] = None,
                            transport_hint: str = "") -> int:
        kind = L.OP_WRITE if int(opcode) == TransferOpcode.WRITE else L.OP_READ
        try:
            ops = self._ops(kind, buffers, peer_buffer_addresses, lengths)
        except KvxError as e:
            return self._fail("batch_transfer_sync", e)
        return self._sync("batch_transfer_sync", target_hostname, ops, notify)

    def _async(self, call: str, target: str, kind: int, buffers, peer_addresses, lengths) -> int:
        try:
            engine = self._require(call)
            ops = self._ops(kind, buffers, peer_addresses, lengths)
            return engine.submit(self._peer(engine, target, call), ops)
        except Exception as e:  # noqa: BLE001
            self._forget_if_gone(target, e)
            return self._fail(call, e, code=0)

    def batch_transfer_async_write(self, target_hostname: str, buffers: Sequence[int],
                                   peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                   transport_hint: str = "") -> int:
        """Submits and returns the batch id (0 on failure); end it with
        get_batch_transfer_status."""
        return self._async("batch_transfer_async_write", target_hostname, L.OP_WRITE,
                           buffers, peer_buffer_addresses, lengths)

    def batch_transfer_async_read(self, target_hostname: str, buffers: Sequence[int],
                                  peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                  transport_hint: str = "") -> int:
        return self._async("batch_transfer_async_read", target_hostname, L.OP_READ,
                           buffers, peer_buffer_addresses, lengths)

    def batch_transfer_async(self, target_hostname: str, buffers: Sequence[int],
                             peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                             opcode: TransferOpcode, transport_hint: str = "") -> int:
        kind = L.OP_WRITE if int(opcode) == TransferOpcode.WRITE else L.OP_READ
        return self._async("batch_transfer_async", target_hostname, kind, buffers, peer_buffer_addresses, lengths)

    def get_batch_transfer_status(self, batch_ids: Sequence[int]) -> int:
        """Waits for every batch (each until its deadline) and frees it: 0 if all
        moved every byte, -1 otherwise. Every id is ended, even after a failure."""
        try:
            engine = self._require("get_batch_transfer_status")
        except Exception as e:  # noqa: BLE001
            return self._fail("get_batch_transfer_status", e, code=-1)
        result = 0
        for batch in batch_ids:
            try:
                st = engine.wait(batch)
                engine.free_batch(batch)
                if st != L.OK:
                    raise _error(st, f"batch {batch} ended so", "get_batch_transfer_status")
            except Exception as e:  # noqa: BLE001
                result = self._fail("get_batch_transfer_status", e, code=-1)
        return result

    def transfer_submit_write(self, target_hostname: str, buffer: int, peer_buffer_address: int, length: int,
                              transport_hint: str = "") -> int:
        """Submits one write; the batch id, or a negative int on failure."""
        try:
            engine = self._require("transfer_submit_write")
            return engine.submit(self._peer(engine, target_hostname, "transfer_submit_write"),
                                 [(L.OP_WRITE, buffer, peer_buffer_address, length)])
        except Exception as e:  # noqa: BLE001
            self._forget_if_gone(target_hostname, e)
            return self._fail("transfer_submit_write", e)

    def transfer_check_status(self, batch_id: int) -> int:
        """1 completed, 0 in progress, -1 failed, -2 timed out (Mooncake's codes); an
        ended batch is freed here."""
        try:
            engine = self._require("transfer_check_status")
            st = engine.batch_status(batch_id)
            if st == L.IN_PROGRESS:
                return 0
            engine.free_batch(batch_id)
            if st == L.OK:
                return 1
            raise _error(st, f"batch {batch_id} ended so", "transfer_check_status")
        except Exception as e:  # noqa: BLE001
            timed_out = isinstance(e, KvxError) and e.status == L.ERR_TIMED_OUT
            return self._fail("transfer_check_status", e, code=-2 if timed_out else -1)

    # -- notifications ---------------------------------------------------------------

    def get_notifies(self) -> List[TransferNotify]:
        """Every notification received since the last call (each once), oldest first."""
        engine = self._engine
        if engine is None:
            return []
        out = []
        while True:
            n = engine.poll_notification(0)
            if n is None:
                return out
            out.append(TransferNotify.decode(n.sender, n.payload))
