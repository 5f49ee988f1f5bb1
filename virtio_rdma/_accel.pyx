# cython: language_level=3
"""Native job path of the accelerator queues (:mod:`virtio_rdma.accel`).

:meth:`NativeJobs.run` takes the jobs at the head of an accelerator queue
that are the plain success case of a *small* FFT or IFFT and carries each
through to its CQE in the calling thread (the daemon's loop), without a
Python object per job: the 256-byte slot is snapshotted and decoded in C,
the two SGEs are checked against the MR table as ``MrTable.check`` does
(key is the MR's lkey, same PD, LOCAL_WRITE for the output, inside the MR,
one chunk of guest memory), the transform runs on the guest's memory in
place (the planned ``FFTCore`` of :mod:`accel_core.dft`), and the CQE is
written as ``CompletionQueue.push`` does (body, then the owner byte with
release order). DPDK's software bbdev devices work the same way: the work is
done inside enqueue and the result goes to the ring.

Rule: a job is checked completely before anything changes, and anything
that is not the plain case stops the call with the job left in the ring:
the Python path (``accel.fetch`` / ``accel.start``) then takes it and every
job after it, so CQEs stay in post order and every error is the Python
path's (same statuses, counters and logs). Not the plain case: another op
or dtype, a size the planner refuses, a job too long for the loop (the
service's model estimates it over ``max_seconds`` and it has more than
``max_points`` points, or this path measured its shape over 4 x
``max_seconds`` on average), not exactly one input and one output SGE, any
flag / iteration / early-stop / reserved byte set, an SGE the checks would
refuse or that spans chunks, a misaligned buffer, input and output
overlapping but not identical, a CQ without room, armed or in error,
and an accelerator with queued jobs or no free unit (the service's
``try_claim``: a native job never overtakes a queued one nor uses more units
than the accelerator has).

Time: the caller gives each call a budget; past it (after one job at least)
the call stops with the rest in the ring (``yielded``) and the router comes
back for them from the loop (``AccelRouter``), so a queue kept full holds the
loop for a slice at a time, between which other guests' doorbells and verbs
traffic are served.

Spin: with ``spin`` > 0 (the device reads doorbell records: DBREC_POLL), a
call that found one job posted (a guest submitting one job at a time), completed
it and so emptied the queue watches the queue's doorbell
record for up to ``spin`` seconds more (GIL released, yielding the CPU
between looks): a guest submitting one job at a time posts its next one a
few microseconds after it sees the CQE, while the loop is still in this call
(its notifications off, so it rings no doorbell), and the job runs at once
instead of after a doorbell and a wake-up of the loop (NAPI's busy poll, per
queue). A record that moved by a plausible amount (at most the depth past
the producer index and the completed jobs) is applied as a kind 4 doorbell
is, and counted in the queue's ``dbrec_applied``; any other value ends the
spin and is left to the Python path (``accel.poll_records`` counts it); a
record that moved by more than one job ends the spinning after those jobs (a
guest keeping jobs queued does not need it, and the loop has other guests'
doorbells to serve). The spin is inside the budget: a guest posting back to
back still gets a slice at a time (a job the spin caught runs in it, however
little of the budget is left: the spin started within it).

Guest memory: pointers come from the device's ``RegionTable`` and are used
within this call only (the loop thread owns the table; guest memory is
never unmapped during a call). The arrays over a job's buffers and what the
checks need of an MR are kept between calls for a guest reusing them, each
used only after this call's translation and MR-table lookup found the same
address and the same MR object.
"""
cimport cython
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from virtio._memory cimport RegionTable
from virtio_rdma._guestring cimport (
    gr_ld16, gr_ld32, gr_ld32_acq, gr_ld64, gr_snapshot, gr_write_cqe,
)
from verbs._verbs cimport IBV_ACCESS_LOCAL_WRITE

import time

import numpy as np

cnp.import_array()

from accel_core import dft
from accel_core.errors import InvalidInput
from accel_core.jobs import JobParams, Op
from virtio_rdma import wire
from virtio_rdma.constants import ACCEL_CQE_OPCODE_BASE, AQ_SLOT_SIZE, AccelDtype, AccelOp, AccelStatus
from virtio_rdma.cq import Arm, CqState

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <time.h>
    static inline double aj_now(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    /* This thread's CPU time: a kernel's own cost, without time the host took the CPU away. */
    static inline double aj_cpu(void) {
        struct timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    """
    double aj_now() noexcept nogil
    double aj_cpu() noexcept nogil

cdef extern from "<sched.h>" nogil:
    int sched_yield()


# The job entry's layout is wire.py's (one definition): checked here at import.
if wire._AJOB.format != "<QBBBBIIHBBf36s" or wire._SGE.format != "<QII":
    raise ImportError("virtio_rdma._accel: the job entry layout of virtio_rdma.wire changed")

cdef enum:
    SLOT = 256
    HDR = 64            # wire.ACCEL_JOB_HEADER_SIZE
    SGE_SZ = 16         # wire.SGE_SIZE
    CQE_SZ = 32         # wire.CQE_SIZE
    OFF_OP = 8
    OFF_DTYPE = 9
    OFF_NIN = 10
    OFF_NOUT = 11
    OFF_SIZE = 12
    OFF_BATCH = 16
    OFF_ITER = 20
    OFF_ESTOP = 22
    OFF_FLAGS = 23
    OFF_RESERVED = 28
    A_LOCAL_WRITE = IBV_ACCESS_LOCAL_WRITE
    CACHE_MAX = 256     # job shapes remembered (plan or "not native")
    SAMPLE_EVERY = 16   # one job of a shape in this many has its CPU time taken and reported
    SLOW_FACTOR = 4     # a shape averaging this many times max_seconds is given up (a slow host;
                        # a busy one, faulting in fresh guest pages, sharing a core, stays well under)
    REFRESH = 4096      # claims between two looks at which accelerators serve an op
    SETTLE = 8          # samples of a shape before their average may rule it out (first
                        # touches of guest pages fault, and inflate the first jobs' times)
    # why the head job was left to the Python path (DECLINE_REASONS names them)
    R_NONE = 0
    R_HEADER = 1        # op, SGE counts, iterations, early stop or flags
    R_RESERVED = 2      # a reserved byte set
    R_SHAPE = 3         # dtype, size or batch the planner refuses, or estimated too long
    R_LENGTH = 4        # an SGE shorter than the job
    R_MR = 5            # an SGE the MR checks refuse, or spanning chunks
    R_ALIGN = 6         # a buffer misaligned for the dtype
    R_OVERLAP = 7       # input and output overlap without being the same
    R_CQ_FULL = 8       # no room in the CQ (or its doorbell record unreachable)
    R_CQ_SLOT = 9       # the CQE's slot unreachable
    N_REASONS = 10

#: seconds after which a job of a shape is observed by the service's model whatever SAMPLE_EVERY says
cdef double OBSERVE_GAP = 1e-3

#: the names of the reasons a job is left to the Python path, by code (NativeJobs.declines())
DECLINE_REASONS = ("none", "header", "reserved", "shape", "length", "mr", "align", "overlap", "cq_full",
                   "cq_slot")

if AQ_SLOT_SIZE != SLOT or wire.ACCEL_JOB_HEADER_SIZE != HDR or wire.SGE_SIZE != SGE_SZ \
        or wire.CQE_SIZE != CQE_SZ or wire.CQE_OWNER_OFFSET != 11:
    raise ImportError("virtio_rdma._accel: slot, SGE or CQE sizes of virtio_rdma.wire changed")

cdef uint8_t _OPCODE_BASE = ACCEL_CQE_OPCODE_BASE
cdef uint8_t _WC_SUCCESS = int(wire.ACCEL_WC_STATUS[AccelStatus.SUCCESS])
cdef uint8_t _ST_SUCCESS = int(AccelStatus.SUCCESS)
cdef uint32_t _SERVICE_MAX = wire.ACCEL_SERVICE_US_MAX
cdef object _CQ_ACTIVE = CqState.ACTIVE
cdef object _ARM_NONE = Arm.NONE
cdef int _C64 = int(AccelDtype.COMPLEX64)
cdef int _FFT = int(AccelOp.FFT)
cdef int _IFFT = int(AccelOp.IFFT)
cdef dict _CORE_OP = {int(AccelOp.FFT): Op.FFT, int(AccelOp.IFFT): Op.IFFT}
cdef dict _DTYPES = {int(AccelDtype.COMPLEX64): np.dtype(np.complex64),
                     int(AccelDtype.COMPLEX128): np.dtype(np.complex128)}


cdef inline object _array(char *p, int dtype, uint32_t size, uint32_t batch):
    """A (batch, size) array over guest memory at host address ``p`` (checked by the caller),
    without a base object: NativeJobs._view keeps the last ones, but uses one only right
    after a translation in the loop's thread (which keeps the memory table) proved that
    its address maps guest memory."""
    cdef cnp.npy_intp dims[2]
    dims[0] = batch
    dims[1] = size
    return cnp.PyArray_SimpleNewFromData(2, dims, cnp.NPY_COMPLEX64 if dtype == _C64 else cnp.NPY_COMPLEX128,
                                         <void *>p)


@cython.final
cdef class _Mr:
    """What the checks need of one MR (MRs do not change once registered), kept per key
    while the MR table maps the key to the same object."""
    cdef object mr
    cdef uint32_t lkey, pdn, access
    cdef uint64_t iova, length, cgpa, clen
    cdef bint one_chunk


cdef inline int _resolve(dict cache, dict by_key, RegionTable table, uint32_t key, uint32_t pdn,
                         uint32_t need, uint64_t va, uint64_t length, uint64_t *gpa_out) except -2:
    """The guest-physical address of [va, va+length) under ``key`` (MrTable.check for a
    local access, then MemoryRegion.views with one chunk): 0, or -1 if not the plain case."""
    mr = by_key.get(key)
    if mr is None:
        return -1
    cdef _Mr m = cache.get(key)
    if m is None or m.mr is not mr:
        m = _Mr()
        m.mr = mr
        m.lkey = <uint32_t>mr.lkey
        m.pdn = <uint32_t>mr.pdn
        m.access = <uint32_t>int(mr.access)
        m.iova = mr.iova
        m.length = mr.length
        chunks = mr.chunks
        m.one_chunk = len(chunks) == 1
        if m.one_chunk:
            m.cgpa, m.clen = chunks[0]
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[key] = m
    cdef uint64_t off
    if m.lkey != key or m.pdn != pdn or need & ~m.access or not m.one_chunk:
        return -1
    if length == 0 or va > 0xFFFFFFFFFFFFFFFF - length or va < m.iova or va + length > m.iova + m.length:
        return -1
    off = va - m.iova
    if off + length > m.clen or table.find(m.cgpa + off, length) < 0:
        return -1
    gpa_out[0] = m.cgpa + off
    return 0


@cython.final
cdef class _View:
    """An array over guest memory kept between calls (NativeJobs._view)."""
    cdef object arr
    cdef uint64_t h
    cdef int dtype
    cdef uint32_t size, batch


@cython.final
cdef class _Shape:
    """A job shape the native path has seen: its plan (None: not for this path) and
    the kernel's CPU time it measured here (exponential average of samples)."""
    cdef object plan
    cdef object model_shape  # the service model's handle of the shape (observe_shape)
    cdef double ewma
    cdef double observed    # when the service's model last learned from a job of this shape
    cdef uint32_t n         # jobs run
    cdef uint32_t samples   # of them, with their CPU time taken


@cython.final
cdef class NativeJobs:
    """The native path of one router: plans of the job shapes seen, the
    accelerators serving FFT / IFFT, and counters (tests assert ``jobs``)."""
    cdef object service
    cdef double max_seconds
    cdef uint64_t max_points
    cdef dict shapes       # (op, dtype, size, batch) -> _Shape
    cdef dict mrs          # lkey -> _Mr (checked against the MR table's object on every use)
    cdef tuple views       # the last input and output arrays (_View each)
    cdef dict serving      # op -> the full-speed accelerators serving it (refreshed every REFRESH claims)
    cdef uint64_t claims
    cdef readonly bint yielded       # the last run() stopped at its time budget, jobs left in the ring
    cdef readonly uint64_t slow_shapes  # shapes given up after measuring them slower than max_seconds
    cdef readonly uint64_t jobs      # jobs completed here
    cdef readonly uint64_t calls     # run() calls that completed at least one job
    cdef readonly uint64_t declined  # run() calls that found the head job not the plain case
    cdef readonly uint64_t spun      # jobs caught on the doorbell record while spinning
    cdef readonly uint64_t spins     # spins started (those that caught nothing: spins - spun)
    cdef uint64_t by_reason[N_REASONS]

    def __init__(self, service, double max_seconds, uint64_t max_points):
        self.service = service
        self.max_seconds = max_seconds
        self.max_points = max_points
        self.shapes = {}
        self.mrs = {}
        self.views = (_View(), _View())
        self.serving = {}
        self.claims = 0
        self.yielded = False
        self.jobs = self.calls = self.declined = self.slow_shapes = self.spun = self.spins = 0
        for i in range(N_REASONS):
            self.by_reason[i] = 0

    def declines(self):
        """Declined run() calls by reason (DECLINE_REASONS), the non-zero ones."""
        return {DECLINE_REASONS[i]: self.by_reason[i] for i in range(1, N_REASONS) if self.by_reason[i]}

    cdef _Shape _shape(self, int op, int dtype, uint32_t size, uint32_t batch):
        """A job shape: planned if it is for this path (a supported size and dtype, and
        either the model's estimate within max_seconds or at most max_points points)."""
        key = (op, dtype, size, batch)
        cdef _Shape sh = self.shapes.get(key)
        if sh is not None:
            return sh
        sh = _Shape()
        plan = None
        dt = _DTYPES.get(dtype)
        if dt is not None and batch >= 1:
            try:
                dft.check_size(size)
                model = self.service.model
                sh.model_shape = model.shape(_CORE_OP[op], JobParams(batch=batch, n=size, dtype=dt))
                est = model.estimate_shape(sh.model_shape)
            except InvalidInput:
                est = None
            except Exception:  # a shape the model does not know: the Python path decides
                est = None
            if est is not None and (est <= self.max_seconds or <uint64_t>size * batch <= self.max_points):
                plan = dft._core(size, dt == _DTYPES[int(AccelDtype.COMPLEX128)], op == _IFFT)
        sh.plan = plan
        if len(self.shapes) >= CACHE_MAX:
            self.shapes.clear()
        self.shapes[key] = sh
        return sh

    def run(self, core, aq, double budget=0.0, double spin=0.0):
        """Complete the plain-case jobs at the head of ``aq`` (see the module
        docstring); returns how many. With ``budget`` > 0 it stops once that many
        seconds have passed (after at least one job), leaving the rest in the
        ring and ``yielded`` True: the caller comes back for them later. With
        ``spin`` > 0 (only where the driver acked DBREC_POLL) it watches the
        queue's doorbell record that long for the next job once the queue ran
        dry after a job (module docstring, Spin). The caller checked: the queue
        has no job in flight (``aq.entries`` empty) and its flags are 0."""
        self.yielded = False
        cdef int op = int(aq.op)
        if op != _FFT and op != _IFFT:
            return 0
        t = getattr(core.mem, "_table", None)
        if type(t) is not RegionTable:
            return 0
        cq = aq.cq
        if cq.state is not _CQ_ACTIVE or cq.arm is not _ARM_NONE:
            return 0
        cdef RegionTable table = <RegionTable>t
        cdef dict by_key = core.mrs._by_key
        cdef uint32_t pdn = aq.pdn, aqn = aq.aqn, depth = aq.depth
        cdef uint32_t fetched = aq.fetched, pi = aq.pi, ci = aq.ci, pi0 = aq.pi, npi
        cdef uint32_t spun = 0
        cdef bint caught = False
        cdef char *dbrec = NULL
        cdef double spin_end
        cdef uint64_t ring_gpa = aq.ring_gpa
        cdef uint32_t cq_depth = cq.depth, pc = cq.pc
        cdef uint64_t cq_ring = cq.ring_gpa, cq_db = cq.dbrec_gpa
        cdef char slot[SLOT]
        cdef char *p
        cdef char *db
        cdef char *e
        cdef uint64_t wr_id, in_addr, out_addr, in_gpa = 0, out_gpa = 0, nbytes, in_len, out_len
        cdef uint64_t xh, yh
        cdef uint32_t size, batch, in_key, out_key, done = 0
        cdef int dtype, i, align
        cdef double t0, t1, c0 = 0.0, c1, busy = 0.0, start = aj_now()
        cdef bint sample
        cdef _Shape sh
        cdef uint32_t service_us
        cdef int declined = R_NONE
        acc = None
        if spin > 0.0 and <uint32_t>(pi - fetched) == 1:  # a guest submitting one job at a time
            dbrec = table.translate(<uint64_t>aq.dbrec_gpa, 4)
        try:
            while True:
                if fetched == pi:
                    # dry: after a job, watch the doorbell record for the next one (Spin)
                    if dbrec == NULL or not done or declined or (budget > 0.0 and aj_now() - start >= budget):
                        break
                    self.spins += 1
                    with nogil:
                        spin_end = aj_now() + spin
                        npi = gr_ld32_acq(dbrec)
                        while npi == pi and aj_now() < spin_end:
                            sched_yield()
                            npi = gr_ld32_acq(dbrec)
                    if npi == pi or <uint32_t>(npi - pi) > depth or <uint32_t>(npi - ci) > depth:
                        break  # nothing came, or an absurd value: the Python path's to count
                    if <uint32_t>(npi - pi) != 1:
                        dbrec = NULL  # a burst: a guest keeping jobs queued, not one waiting on each
                    pi = npi
                    spun += 1
                    caught = True  # run at once: the spin began inside the budget
                    continue
                if budget > 0.0 and done and not caught and aj_now() - start >= budget:
                    self.yielded = True
                    break
                caught = False
                p = table.translate(ring_gpa + (fetched & (depth - 1)) * SLOT, SLOT)
                if p == NULL:
                    break
                gr_snapshot(slot, p, SLOT)
                if (<uint8_t>slot[OFF_OP] != op or <uint8_t>slot[OFF_NIN] != 1
                        or <uint8_t>slot[OFF_NOUT] != 1 or gr_ld16(slot + OFF_ITER) != 0
                        or slot[OFF_ESTOP] != 0 or slot[OFF_FLAGS] != 0):
                    declined = R_HEADER
                    break
                for i in range(OFF_RESERVED, HDR):
                    if slot[i] != 0:
                        break
                else:
                    i = HDR
                if i != HDR:
                    declined = R_RESERVED
                    break
                dtype = <uint8_t>slot[OFF_DTYPE]
                size = gr_ld32(slot + OFF_SIZE)
                batch = gr_ld32(slot + OFF_BATCH)
                sh = self._shape(op, dtype, size, batch)
                plan = sh.plan
                if plan is None:
                    declined = R_SHAPE
                    break
                dt = _DTYPES[dtype]
                align = dt.alignment
                nbytes = <uint64_t>size * batch * <uint64_t>dt.itemsize
                wr_id = gr_ld64(slot)
                in_addr, in_len, in_key = gr_ld64(slot + HDR), gr_ld32(slot + HDR + 8), gr_ld32(slot + HDR + 12)
                out_addr = gr_ld64(slot + HDR + SGE_SZ)
                out_len = gr_ld32(slot + HDR + SGE_SZ + 8)
                out_key = gr_ld32(slot + HDR + SGE_SZ + 12)
                if in_len < nbytes or out_len < nbytes:
                    declined = R_LENGTH
                    break
                if (_resolve(self.mrs, by_key, table, in_key, pdn, 0, in_addr, in_len, &in_gpa) < 0
                        or _resolve(self.mrs, by_key, table, out_key, pdn, A_LOCAL_WRITE, out_addr, out_len,
                                    &out_gpa) < 0):
                    declined = R_MR
                    break
                xh = <uint64_t>table.translate(in_gpa, nbytes)
                yh = <uint64_t>table.translate(out_gpa, nbytes)
                if xh % align or yh % align:
                    declined = R_ALIGN
                    break
                if xh != yh and xh < yh + nbytes and yh < xh + nbytes:
                    declined = R_OVERLAP  # overlapping, not in place
                    break
                # the CQE's slot (CompletionQueue.push's checks)
                db = table.translate(cq_db, 4)
                if db == NULL or <uint32_t>(pc - gr_ld32_acq(db)) >= cq_depth:
                    declined = R_CQ_FULL
                    break
                e = table.translate(cq_ring + (pc & (cq_depth - 1)) * CQE_SZ, CQE_SZ)
                if e == NULL:
                    declined = R_CQ_SLOT
                    break
                if acc is None:
                    acc = self._claim(op)
                    if acc is None:
                        break
                # checked: run it in place on the guest's memory
                y = self._view(1, yh, dtype, size, batch)
                x = y if xh == yh else self._view(0, xh, dtype, size, batch)
                # One job of a shape in SAMPLE_EVERY has its kernel's CPU time taken (a system
                # call, ~0.6 us): the shape's average (a slow host). The service's model learns
                # the kernel's time the CQE reports (service_us) from those, and from any job of
                # a shape not observed for OBSERVE_GAP: a shape a guest submits now and then is
                # learned from each of its jobs, a stream of one shape costs at most one
                # observe_shape call (a few us of Python) per OBSERVE_GAP.
                sample = (sh.n & (SAMPLE_EVERY - 1)) == 1  # not the first: a cold cache and plan
                if sample:
                    c0 = aj_cpu()
                t0 = aj_now()
                try:
                    plan.execute(x, y)
                except Exception:  # the kernel's scratch allocation: this shape goes to the workers,
                    sh.plan = None  # which run (and report) this job from the start
                    declined = R_SHAPE
                    break
                t1 = aj_now()
                busy += t1 - t0
                sh.n += 1
                if sample or (sh.n > 1 and t1 - sh.observed > OBSERVE_GAP):
                    sh.observed = t1
                    self.service.model.observe_shape(sh.model_shape, t1 - t0)
                if sample:
                    c1 = aj_cpu() - c0
                    sh.ewma = c1 if sh.samples == 0 else 0.75 * sh.ewma + 0.25 * c1
                    sh.samples += 1
                    if sh.samples >= SETTLE and sh.ewma > SLOW_FACTOR * self.max_seconds:
                        sh.plan = None  # far longer than planned: a slow host
                        self.slow_shapes += 1
                service_us = <uint32_t>((t1 - t0) * 1e6)
                if service_us > _SERVICE_MAX:
                    service_us = _SERVICE_MAX
                gr_write_cqe(e, wr_id, _WC_SUCCESS, _OPCODE_BASE | op, _ST_SUCCESS, <uint32_t>nbytes,
                             0, aqn, 0, service_us, ((pc // cq_depth) & 1) ^ 1)
                pc += 1
                fetched += 1
                ci += 1
                done += 1
        finally:
            if pi != pi0:  # taken from the doorbell record while spinning: a kind 4 doorbell's effect
                aq.pi = pi
                aq.dbrec_seen = pi
                aq.metrics.dbrec_applied += spun
                self.spun += spun
            if done:
                cq.pc = pc
                cq.written += done
                aq.fetched = fetched
                aq.ci = ci
                m = aq.metrics
                m.jobs_posted += done
                m.jobs_completed += done
                cm = core.metrics
                cm.aq_jobs += done
                cm.aq_completions += done
                cm.completions += done
                self.jobs += done
                self.calls += 1
            if declined:
                self.declined += 1
                self.by_reason[declined] += 1
            if acc is not None:
                acc.release_claim(_CORE_OP[op], done, busy)
        return done

    cdef object _view(self, int which, uint64_t h, int dtype, uint32_t size, uint32_t batch):
        """The (batch, size) array at host address ``h`` (just translated and checked by
        the caller): the one made last time for input (0) or output (1) if it was the same
        address and shape -- a guest reusing its buffers -- else a new one, kept for next
        time. Used only right after the translation that proves ``h`` maps guest memory."""
        cdef _View v = self.views[which]
        if v.h != h or v.dtype != dtype or v.size != size or v.batch != batch or v.arr is None:
            v.arr = _array(<char *>h, dtype, size, batch)
            v.h, v.dtype, v.size, v.batch = h, dtype, size, batch
        return v.arr

    cdef object _claim(self, int op):
        """A unit of a local accelerator serving ``op`` (full speed), claimed; None if none is free."""
        cdef tuple accs
        self.claims += 1
        if self.claims & (REFRESH - 1) == 0 or op not in self.serving:  # accelerators added later
            self.serving = {o: tuple(a for a in self.service.serving(c) if a.slowdown == 1.0)
                            for o, c in _CORE_OP.items()}
        accs = self.serving[op]
        for a in accs:
            if a.try_claim():
                return a
        return None
