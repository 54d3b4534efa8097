/* zonewatch kvm channel: what each zone asks of the hypervisor, counted in the kernel.
 *
 * kvm:* tracepoints fire in the context of the vCPU thread that caused them, so a zone is
 * found by that thread. A zone's vCPU thread pays one lookup (its state in `vcpus`, by
 * tid) to be recognised; a thread of no zone two failed ones on the per-exit events (tid,
 * then tgid in zone_pids) and one on the hot ones (see zone_thread and known_thread).
 * A zone's thread gets its state entry at its first exit, with the zone of its tid in
 * zone_tids (the inventory's vCPU threads) or else of its process. So the keys of `vcpus`
 * are the threads seen running KVM_RUN for a zone: user space reads them to learn the vCPU
 * threads of VMMs that leave their threads unnamed (KvmProbe.vcpu_threads), at no cost
 * here.
 *
 * Everything frequent is counted in the kernel; no per-exit record crosses into user
 * space. Per (zone, key) counts live in hash maps, with a cap per zone on the keys whose
 * values the guest picks (ports, MMIO pages, MSRs, hypercalls: see new_key). The hottest
 * bounded counts (emulated instructions, the latency histograms) are kept per thread in
 * its state, without atomics or a second lookup, and folded into the per-zone maps when
 * the thread exits; user space adds the live threads' shares when it reads. Only
 * hypercalls and MSR writes are sent as records, at most ZW_KVM_SAMPLES_PER_SEC per zone
 * and second (the counters see them all).
 *
 * Latencies are log2 histograms per zone, from per-thread timestamps:
 *  - kvm_exit -> the thread's next kvm_entry (as `perf kvm stat` measures it: this includes
 *    any round trip through the VMM in user space);
 *  - kvm_userspace_exit -> the thread's next KVM_RUN, i.e. the time the VMM spent in user
 *    space handling the exit. KVM_RUN is marked by kvm_fpu(load), which KVM fires as it
 *    loads the guest FPU state at the start of every KVM_RUN, before the first entry, or
 *    else by kvm_entry: whichever comes first closes the interval.
 *
 * Each probe is compiled only when its tracepoint exists (-DZW_TP_<name>, set by the
 * loader), so one source serves every kernel; kvm_exit and kvm_entry never fire on hosts
 * that emulate the guest (nested PVM), and tests replay recorded ones instead. The events
 * that fire per exit or per emulated instruction (userspace_exit, pio, mmio, fast_mmio,
 * msr, emulate_insn, fpu) attach as raw tracepoints when the loader found their formats as
 * expected (-DZW_RAW_<name>): the arguments read are plain integers of TP_PROTO, and a raw
 * tracepoint skips filling a trace record at every firing. kvm_exit and kvm_entry take
 * the vcpu struct, so they stay classic.
 */
#include "zonewatch.h"

#ifndef ZW_MAX_ZONE_PIDS
#define ZW_MAX_ZONE_PIDS 16384
#endif
#ifndef ZW_MAX_VCPU_THREADS
#define ZW_MAX_VCPU_THREADS 8192
#endif
#ifndef ZW_MAX_COUNTERS
#define ZW_MAX_COUNTERS 16384
#endif
#ifndef ZW_RINGBUF_PAGES
#define ZW_RINGBUF_PAGES 64
#endif
#ifndef ZW_KVM_SAMPLES_PER_SEC
#define ZW_KVM_SAMPLES_PER_SEC 64
#endif
#ifndef ZW_KVM_KEYS_PER_ZONE
#define ZW_KVM_KEYS_PER_ZONE 256
#endif

#define ZW_NSEC_PER_SEC 1000000000ULL

/* The per-zone sample budget: a one-second window and what it has used. */
struct zw_budget {
	u64 window_start;
	u64 used;
};

/* Keys a zone has made in the maps whose keys the guest chooses (see new_key). */
enum zw_key_kind { ZW_KEYS_PIO, ZW_KEYS_MMIO, ZW_KEYS_CTR, ZW_KEYS_NKINDS };

struct zw_zone_keys {
	u32 made[ZW_KEYS_NKINDS];
	u32 _pad;
};

BPF_HASH(zone_pids, u32, u32, ZW_MAX_ZONE_PIDS);     /* tgid -> zone key */
BPF_HASH(zone_tids, u32, u32, ZW_MAX_VCPU_THREADS);  /* vCPU tid -> zone key */

BPF_HASH(exits, struct zw_kvm_exit_key, u64, ZW_MAX_COUNTERS);
BPF_HASH(uexits, struct zw_kvm_uexit_key, u64, ZW_MAX_COUNTERS);
BPF_HASH(pio, struct zw_kvm_pio_key, struct zw_sum, ZW_MAX_COUNTERS);
BPF_HASH(mmio, struct zw_kvm_mmio_key, struct zw_sum, ZW_MAX_COUNTERS);
BPF_HASH(counters, struct zw_kvm_ctr_key, u64, ZW_MAX_COUNTERS);
BPF_HASH(hist, struct zw_hist_key, u64, ZW_MAX_COUNTERS);  /* folded from exited threads */

/* Not LRU: an evicted entry would take its unfolded counts with it. Entries leave when the
 * thread exits (sched_process_exit) or its zone does (user space, after a last read). */
BPF_HASH(vcpus, u32, struct zw_vcpu_state, ZW_MAX_VCPU_THREADS);
BPF_HASH(budget, u32, struct zw_budget, ZW_MAX_ZONE_PIDS);           /* zone key -> */
BPF_HASH(zone_keys, u32, struct zw_zone_keys, ZW_MAX_ZONE_PIDS);     /* zone key -> */

/* A zeroed state to create entries from: the struct is too big for the BPF stack. */
BPF_PERCPU_ARRAY(blank_state, struct zw_vcpu_state, 1);
BPF_PERCPU_ARRAY(scratch, struct zw_kvm_event, 1);
BPF_PERCPU_ARRAY(lost, u64, ZW_CLOST_NSOURCES);
BPF_RINGBUF_OUTPUT(events, ZW_RINGBUF_PAGES);

static __always_inline void count_lost(int source)
{
	u64 *n = lost.lookup(&source);
	if (n)
		(*n)++;
}

/* Counters are created at zero on first use (lookup_or_try_init); a NULL means the map was
 * full, which is counted, never silent. (bcc cannot rewrite map calls inside macros, hence
 * these helpers take the looked-up value.) */
static __always_inline void bump(u64 *v, u64 n)
{
	if (v)
		__sync_fetch_and_add(v, n);
	else
		count_lost(ZW_CLOST_MAP_FULL);
}

static __always_inline void bump_sum(struct zw_sum *v, u64 amount)
{
	if (v) {
		__sync_fetch_and_add(&v->count, 1);
		__sync_fetch_and_add(&v->total, amount);
	} else {
		count_lost(ZW_CLOST_MAP_FULL);
	}
}

/* The log2 slot of a value: 0 for 0, else floor(log2(v)) + 1, so slot s holds
 * [2^(s-1), 2^s); capped at the last slot. zonewatch/probes/hist.py log2_slot() is the
 * same function. */
static __always_inline u32 log2_slot(u64 v)
{
	u32 slot = v ? bpf_log2l(v) : 0;
	return slot < ZW_HIST_SLOTS ? slot : ZW_HIST_SLOTS - 1;
}

/* Whether a zone may make one more key of a kind. Ports, MMIO pages, MSR indices and
 * hypercall numbers are the guest's to choose: a guest sweeping them would fill the
 * shared maps and leave every other zone uncounted. So past ZW_KVM_KEYS_PER_ZONE keys of
 * a kind, a zone's new ones are counted together in its ZW_KVM_KEY_OTHER key: its totals
 * stay right, and only the breakdown is capped. Only called on a miss, so a zone's known
 * keys (all of them, in a steady guest) cost nothing more. Racy across CPUs by design: a
 * key or two over is harmless. */
static __always_inline int new_key(u32 zone_key, u32 kind)
{
	struct zw_zone_keys zero = {};
	struct zw_zone_keys *keys = zone_keys.lookup_or_try_init(&zone_key, &zero);
	if (!keys || kind >= ZW_KEYS_NKINDS || keys->made[kind] >= ZW_KVM_KEYS_PER_ZONE)
		return 0;
	__sync_fetch_and_add(&keys->made[kind], 1);
	return 1;
}

/* Code 0 is never "other": it is the only code of the emulation counts, so those always
 * keep their own keys, and for the rest it is one key more per zone. */
static __always_inline void count_ctr(u32 zone_key, u32 kind, u64 code, u64 n)
{
	struct zw_kvm_ctr_key key = {.zone_key = zone_key, .kind = kind, .code = code};
	u64 *count = counters.lookup(&key);
	if (!count) {
		if (code && !new_key(zone_key, ZW_KEYS_CTR)) {
			key.code = 0;
			key.flags = ZW_KVM_KEY_OTHER;
		}
		u64 zero = 0;
		count = counters.lookup_or_try_init(&key, &zero);
	}
	bump(count, n);
}

/* The calling thread's state if it belongs to a zone, created on its first such event.
 * Only VMM threads fire kvm events and on a watched host nearly all VMMs are zones, so the
 * thread's own state comes first: a zone's vCPU thread pays one lookup per event. Any
 * other thread pays a second, its tgid in zone_pids, and a thread of no zone nothing more.
 * A new zone thread takes its zone from the inventory's vCPU tids, or else its process.
 * (A thread whose zone left the inventory keeps counting to it until user space purges
 * the zone's states, at the next collect.) */
static __always_inline struct zw_vcpu_state *zone_thread(u64 id)
{
	u32 tid = (u32)id;
	struct zw_vcpu_state *st = vcpus.lookup(&tid);
	if (st)
		return st;
	u32 tgid = id >> 32;
	u32 *process_zone = zone_pids.lookup(&tgid);
	if (!process_zone)
		return 0;
	u32 *thread_zone = zone_tids.lookup(&tid);
	u32 zone_key = thread_zone ? *thread_zone : *process_zone;
	int zero = 0;
	struct zw_vcpu_state *blank = blank_state.lookup(&zero);
	if (!blank)
		return 0;
	st = vcpus.lookup_or_try_init(&tid, blank);
	if (!st) {
		count_lost(ZW_CLOST_STATE_FULL);
		return 0;
	}
	st->zone_key = zone_key;
	return st;
}

/* The hot events (each guest instruction emulated, each KVM_RUN, each entry) only look at
 * threads that have state already: one lookup for any thread. A zone's vCPU thread gets its
 * state at its first exit, which comes before any of them matters. */
static __always_inline struct zw_vcpu_state *known_thread(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	return vcpus.lookup(&tid);
}

/* Plain increments: only the thread itself touches its state while it runs. */
static __always_inline void lat_add(u64 *slots, u64 ns)
{
	u32 slot = log2_slot(ns);
	if (slot < ZW_HIST_SLOTS)  /* always; restated for the verifier */
		slots[slot]++;
}

/* The thread (re)enters KVM_RUN: close the user-space interval opened by its last exit. */
static __always_inline void run_begins(struct zw_vcpu_state *st, u64 now)
{
	if (st->uexit_ts) {
		lat_add(st->user_lat, now - st->uexit_ts);
		st->uexit_ts = 0;
	}
}

static __always_inline void fold_hist(u32 zone_key, u16 kind, u64 *slots)
{
#pragma unroll
	for (int i = 0; i < ZW_HIST_SLOTS; i++) {
		u64 n = slots[i];
		if (!n)
			continue;
		struct zw_hist_key key = {.zone_key = zone_key, .kind = kind, .slot = i};
		u64 zero = 0;
		bump(hist.lookup_or_try_init(&key, &zero), n);
	}
}

/* A fresh sampled record in per-CPU scratch, if the zone's budget allows one; the caller
 * fills the op's fields and sends it with sample_send(). (Built in scratch rather than
 * reserved in the ring: these records are rare, and the scratch map gives the layout test a
 * compiled struct zw_kvm_event to compare the Python mirror with.) */
static __always_inline struct zw_kvm_event *sample_begin(u64 id, u32 zone_key, u32 op, u64 code)
{
	u64 now = bpf_ktime_get_ns();
	struct zw_budget init = {.window_start = now};
	struct zw_budget *b = budget.lookup_or_try_init(&zone_key, &init);
	if (!b) {
		count_lost(ZW_CLOST_MAP_FULL);
		return 0;
	}
	/* Racy across CPUs by design: the budget is a rate, not an exact quota. */
	if (now - b->window_start >= ZW_NSEC_PER_SEC) {
		b->window_start = now;
		b->used = 0;
	}
	if (b->used >= ZW_KVM_SAMPLES_PER_SEC) {
		count_lost(ZW_CLOST_RATE_LIMITED);
		return 0;
	}
	__sync_fetch_and_add(&b->used, 1);
	int zero = 0;
	struct zw_kvm_event *e = scratch.lookup(&zero);
	if (!e)
		return 0;
	__builtin_memset(e, 0, sizeof(*e));
	e->hdr.type = ZW_REC_KVM;
	e->hdr.size = sizeof(*e);
	e->hdr.zone_key = zone_key;
	e->hdr.ts_ns = now;
	e->hdr.pid = id >> 32;
	e->hdr.tid = (u32)id;
	bpf_get_current_comm(&e->hdr.comm, sizeof(e->hdr.comm));
	e->op = op;
	e->code = code;
	return e;
}

static __always_inline void sample_send(struct zw_kvm_event *e)
{
	if (events.ringbuf_output(e, sizeof(*e), 0) != 0)
		count_lost(ZW_CLOST_RINGBUF);
}

/* A thread's end: its unfolded counts join its zone's maps, then its state goes. And a
 * reused pid or tid must never inherit a dead zone. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	u32 tgid = id >> 32;
	struct zw_vcpu_state *st = vcpus.lookup(&tid);
	if (st) {
		u32 zone_key = st->zone_key;
		if (st->emulated)
			count_ctr(zone_key, ZW_KVM_CTR_EMULATE, 0, st->emulated);
		if (st->emulate_failed)
			count_ctr(zone_key, ZW_KVM_CTR_EMULATE_FAILED, 0, st->emulate_failed);
		fold_hist(zone_key, ZW_HIST_KVM_EXIT, st->exit_lat);
		fold_hist(zone_key, ZW_HIST_KVM_USERSPACE, st->user_lat);
		vcpus.delete(&tid);
	}
	zone_tids.delete(&tid);
	if (tid == tgid)
		zone_pids.delete(&tgid);
	return 0;
}

/* ---- exits and entries (hardware-assisted hosts) ---- */
#ifdef ZW_TP_kvm_exit
TRACEPOINT_PROBE(kvm, kvm_exit)
{
	struct zw_vcpu_state *st = zone_thread(bpf_get_current_pid_tgid());
	if (!st)
		return 0;
	struct zw_kvm_exit_key key = {
		.zone_key = st->zone_key,
#ifdef ZW_KVM_EXIT_VCPU_ID
		.vcpu_id = args->vcpu_id,
#endif
		.reason = args->exit_reason,
		.isa = args->isa,
	};
	u64 zero = 0;
	bump(exits.lookup_or_try_init(&key, &zero), 1);
	st->exit_ts = bpf_ktime_get_ns();
	return 0;
}
#endif

#ifdef ZW_TP_kvm_entry
TRACEPOINT_PROBE(kvm, kvm_entry)
{
	struct zw_vcpu_state *st = known_thread();
	if (!st)
		return 0;
	if (!(st->flags & ZW_VCPU_ENTERED))
		st->flags |= ZW_VCPU_ENTERED;
	u64 now = bpf_ktime_get_ns();
	if (st->exit_ts) {
		lat_add(st->exit_lat, now - st->exit_ts);
		st->exit_ts = 0;
	}
	run_begins(st, now);  /* a no-op where kvm_fpu closed the interval already */
	return 0;
}
#endif

/* ---- returns to the VMM ---- */
#ifdef ZW_TP_kvm_userspace_exit
static __always_inline int on_userspace_exit(u32 reason, int err)
{
	struct zw_vcpu_state *st = zone_thread(bpf_get_current_pid_tgid());
	if (!st)
		return 0;
	struct zw_kvm_uexit_key key = {
		.zone_key = st->zone_key,
		.reason = reason,
		.err = err < 0 ? -err : 0,
	};
	u64 zero = 0;
	bump(uexits.lookup_or_try_init(&key, &zero), 1);
#ifndef ZW_TP_kvm_fpu
	/* Without kvm_fpu only kvm_entry closes the interval, and where it never fires the
	 * clock read (~60 ns under nested virt) would be wasted at every exit. */
	if (!(st->flags & ZW_VCPU_ENTERED))
		return 0;
#endif
	st->uexit_ts = bpf_ktime_get_ns();
	return 0;
}

#ifdef ZW_RAW_kvm_userspace_exit
RAW_TRACEPOINT_PROBE(kvm_userspace_exit)
{
	/* TP_PROTO(__u32 reason, int errno) */
	return on_userspace_exit(ctx->args[0], (int)ctx->args[1]);
}
#else
TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
	return on_userspace_exit(args->reason, args->errno);
}
#endif
#endif

static __always_inline int on_fpu(u64 load)
{
	if (!load)
		return 0;
	struct zw_vcpu_state *st = known_thread();
	if (st && st->uexit_ts)
		run_begins(st, bpf_ktime_get_ns());
	return 0;
}

#if defined(ZW_TP_kvm_fpu) && defined(ZW_RAW_kvm_fpu)
RAW_TRACEPOINT_PROBE(kvm_fpu)
{
	return on_fpu(ctx->args[0]);  /* TP_PROTO(int load) */
}
#elif defined(ZW_TP_kvm_fpu)
TRACEPOINT_PROBE(kvm, kvm_fpu)
{
	return on_fpu(args->load);
}
#endif

/* ---- device I/O ---- */
#ifdef ZW_TP_kvm_pio
static __always_inline int on_pio(u32 rw, u32 port, u32 size, u32 count)
{
	struct zw_vcpu_state *st = zone_thread(bpf_get_current_pid_tgid());
	if (!st)
		return 0;
	struct zw_kvm_pio_key key = {
		.zone_key = st->zone_key,
		.port = (u16)port,
		.dir = rw ? 1 : 0,
	};
	struct zw_sum *sum = pio.lookup(&key);
	if (!sum) {
		if (!new_key(key.zone_key, ZW_KEYS_PIO)) {
			key.port = 0;
			key.flags = ZW_KVM_KEY_OTHER;
		}
		struct zw_sum zero = {};
		sum = pio.lookup_or_try_init(&key, &zero);
	}
	bump_sum(sum, (u64)size * count);
	return 0;
}

#ifdef ZW_RAW_kvm_pio
/* TP_PROTO(unsigned int rw, unsigned int port, unsigned int size, unsigned int count, ...) */
RAW_TRACEPOINT_PROBE(kvm_pio)
{
	return on_pio(ctx->args[0], ctx->args[1], ctx->args[2], ctx->args[3]);
}
#else
TRACEPOINT_PROBE(kvm, kvm_pio)
{
	return on_pio(args->rw, args->port, args->size, args->count);
}
#endif
#endif

#if defined(ZW_TP_kvm_mmio) || defined(ZW_TP_kvm_fast_mmio)
static __always_inline int on_mmio(u32 access, u32 len, u64 gpa)
{
	struct zw_vcpu_state *st = zone_thread(bpf_get_current_pid_tgid());
	if (!st)
		return 0;
	struct zw_kvm_mmio_key key = {
		.zone_key = st->zone_key,
		.access = access,
		.page = gpa & ~0xfffULL,
	};
	struct zw_sum *sum = mmio.lookup(&key);
	if (!sum) {
		if (!new_key(key.zone_key, ZW_KEYS_MMIO)) {
			key.page = 0;
			key.flags = ZW_KVM_KEY_OTHER;
		}
		struct zw_sum zero = {};
		sum = mmio.lookup_or_try_init(&key, &zero);
	}
	bump_sum(sum, len);
	return 0;
}
#endif

#ifdef ZW_TP_kvm_mmio
#ifdef ZW_RAW_kvm_mmio
RAW_TRACEPOINT_PROBE(kvm_mmio)
{
	/* TP_PROTO(int type, int len, u64 gpa, ...) */
	return on_mmio(ctx->args[0], ctx->args[1], ctx->args[2]);
}
#else
TRACEPOINT_PROBE(kvm, kvm_mmio)
{
	return on_mmio(args->type, args->len, args->gpa);
}
#endif
#endif

#ifdef ZW_TP_kvm_fast_mmio
#ifdef ZW_RAW_kvm_fast_mmio
RAW_TRACEPOINT_PROBE(kvm_fast_mmio)
{
	return on_mmio(ZW_KVM_MMIO_FAST_WRITE, 0, ctx->args[0]);  /* TP_PROTO(u64 gpa) */
}
#else
TRACEPOINT_PROBE(kvm, kvm_fast_mmio)
{
	return on_mmio(ZW_KVM_MMIO_FAST_WRITE, 0, args->gpa);
}
#endif
#endif

/* ---- instructions the hypervisor handles for the guest ---- */
static __always_inline int on_emulate(u64 failed)
{
	struct zw_vcpu_state *st = known_thread();
	if (!st)
		return 0;
	if (failed)
		st->emulate_failed++;
	else
		st->emulated++;
	return 0;
}

#if defined(ZW_TP_kvm_emulate_insn) && defined(ZW_RAW_kvm_emulate_insn)
RAW_TRACEPOINT_PROBE(kvm_emulate_insn)
{
	return on_emulate((u8)ctx->args[1]);  /* TP_PROTO(struct kvm_vcpu *vcpu, __u8 failed) */
}
#elif defined(ZW_TP_kvm_emulate_insn)
TRACEPOINT_PROBE(kvm, kvm_emulate_insn)
{
	return on_emulate(args->failed);
}
#endif

#ifdef ZW_TP_kvm_cpuid
TRACEPOINT_PROBE(kvm, kvm_cpuid)
{
	struct zw_vcpu_state *st = zone_thread(bpf_get_current_pid_tgid());
	if (!st)
		return 0;
	count_ctr(st->zone_key, ZW_KVM_CTR_CPUID, args->function, 1);
	return 0;
}
#endif

#ifdef ZW_TP_kvm_msr
/* Frequent, routine writes: counted, never sampled (x2APIC registers, TSC deadline timer). */
static __always_inline int msr_is_routine(u32 msr)
{
	return (msr >= 0x800 && msr <= 0x8ff) || msr == 0x6e0;
}

static __always_inline int on_msr(u32 write, u32 msr, u64 data, u32 exception)
{
	u64 id = bpf_get_current_pid_tgid();
	struct zw_vcpu_state *st = zone_thread(id);
	if (!st)
		return 0;
	u32 zone_key = st->zone_key;
	int fault = exception != 0;
	u32 kind = write ? (fault ? ZW_KVM_CTR_MSR_WRITE_GP : ZW_KVM_CTR_MSR_WRITE)
			 : (fault ? ZW_KVM_CTR_MSR_READ_GP : ZW_KVM_CTR_MSR_READ);
	count_ctr(zone_key, kind, msr, 1);
	if (!write || msr_is_routine(msr))
		return 0;
	struct zw_kvm_event *e = sample_begin(id, zone_key, ZW_KVM_MSR_WRITE, msr);
	if (!e)
		return 0;
	e->args[0] = data;
	e->flags = fault ? ZW_KVM_F_FAULT : 0;
	sample_send(e);
	return 0;
}

#ifdef ZW_RAW_kvm_msr
RAW_TRACEPOINT_PROBE(kvm_msr)
{
	/* TP_PROTO(unsigned write, u32 ecx, u64 data, bool exception) */
	return on_msr(ctx->args[0] != 0, ctx->args[1], ctx->args[2], (u8)ctx->args[3]);
}
#else
TRACEPOINT_PROBE(kvm, kvm_msr)
{
	return on_msr(args->write != 0, args->ecx, args->data, args->exception);
}
#endif
#endif

/* ---- hypercalls ---- */
#if defined(ZW_TP_kvm_hypercall) || defined(ZW_TP_kvm_hv_hypercall) || \
	defined(ZW_TP_kvm_xen_hypercall)
/* A zone's hypercall: counted, then a record to fill if the zone's budget allows one. */
static __always_inline struct zw_kvm_event *on_hypercall(u32 kind, u32 op, u64 code)
{
	u64 id = bpf_get_current_pid_tgid();
	struct zw_vcpu_state *st = zone_thread(id);
	if (!st)
		return 0;
	count_ctr(st->zone_key, kind, code, 1);
	return sample_begin(id, st->zone_key, op, code);
}
#endif

#ifdef ZW_TP_kvm_hypercall
TRACEPOINT_PROBE(kvm, kvm_hypercall)
{
	struct zw_kvm_event *e = on_hypercall(ZW_KVM_CTR_HYPERCALL, ZW_KVM_HYPERCALL, args->nr);
	if (!e)
		return 0;
	e->args[0] = args->a0;
	e->args[1] = args->a1;
	e->args[2] = args->a2;
	e->args[3] = args->a3;
	sample_send(e);
	return 0;
}
#endif

#ifdef ZW_TP_kvm_hv_hypercall
TRACEPOINT_PROBE(kvm, kvm_hv_hypercall)
{
	struct zw_kvm_event *e =
		on_hypercall(ZW_KVM_CTR_HV_HYPERCALL, ZW_KVM_HV_HYPERCALL, args->code);
	if (!e)
		return 0;
	e->args[0] = args->ingpa;
	e->args[1] = args->outgpa;
	e->args[2] = args->rep_cnt;
	e->flags = args->fast ? ZW_KVM_F_FAST : 0;
	sample_send(e);
	return 0;
}
#endif

#ifdef ZW_TP_kvm_xen_hypercall
TRACEPOINT_PROBE(kvm, kvm_xen_hypercall)
{
	struct zw_kvm_event *e =
		on_hypercall(ZW_KVM_CTR_XEN_HYPERCALL, ZW_KVM_XEN_HYPERCALL, args->nr);
	if (!e)
		return 0;
	e->args[0] = args->a0;
	e->args[1] = args->a1;
	e->args[2] = args->a2;
	e->args[3] = args->a3;
	e->args[4] = args->a4;
	e->args[5] = args->a5;
	sample_send(e);
	return 0;
}
#endif
