/* zonewatch sched channel: how long each zone's vCPU threads wait to run, and the CPU time
 * each zone gets. The noisy-neighbour signal, counted in the kernel.
 *
 * Run delay is the time a vCPU thread spends runnable but not running: from its wake-up
 * (sched_wakeup, sched_wakeup_new), or from the moment it was switched out while still
 * runnable (preempted: sched_switch with no sleep state), to the sched_switch that puts it
 * on a CPU. It goes into a log2 histogram per zone, plus a count and a sum.
 *
 * On-CPU time is the time since the previous context switch on this CPU, charged at
 * sched_switch to the task leaving the CPU (prev is `current` there), so no per-task stamp
 * is needed: a per-CPU "last switch" timestamp does it.
 *
 * What a thread outside every zone pays: one zone_pids lookup as it leaves a CPU, one
 * `waiting` lookup as it gets one, one zone_tids lookup when it is woken, and the per-CPU
 * timestamp update.
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

/* prev_state bits that mean "went to sleep" (TASK_REPORT and TASK_REPORT_IDLE); with none
 * of them set the task was still runnable (preempted, or yielded). The preemption marker
 * TASK_REPORT_MAX sits above them and is ignored. */
#define ZW_TASK_SLEEP_BITS 0xff

BPF_HASH(zone_pids, u32, u32, ZW_MAX_ZONE_PIDS);   /* tgid -> zone key */
BPF_HASH(zone_tids, u32, u32, ZW_MAX_VCPU_THREADS);  /* vCPU tid -> zone key */
BPF_TABLE("lru_hash", u32, struct zw_wait_state, waiting, ZW_MAX_VCPU_THREADS);
BPF_HASH(hist, struct zw_hist_key, u64, ZW_MAX_COUNTERS);
BPF_HASH(totals, struct zw_sched_key, struct zw_sum, ZW_MAX_COUNTERS);
BPF_PERCPU_ARRAY(last_switch, u64, 1);
BPF_PERCPU_ARRAY(lost, u64, ZW_CLOST_NSOURCES);

static __always_inline void count_lost(int source)
{
	u64 *n = lost.lookup(&source);
	if (n)
		(*n)++;
}

/* See bpf/kvm.c: 0 for 0, else floor(log2(v)) + 1, capped at the last slot;
 * zonewatch/probes/hist.py log2_slot(). */
static __always_inline u16 log2_slot(u64 v)
{
	u32 slot = v ? bpf_log2l(v) : 0;
	return slot < ZW_HIST_SLOTS ? slot : ZW_HIST_SLOTS - 1;
}

static __always_inline void add_total(u32 zone_key, u32 kind, u64 amount)
{
	struct zw_sched_key key = {.zone_key = zone_key, .kind = kind};
	struct zw_sum zero = {};
	struct zw_sum *v = totals.lookup_or_try_init(&key, &zero);
	if (!v) {
		count_lost(ZW_CLOST_MAP_FULL);
		return;
	}
	__sync_fetch_and_add(&v->count, 1);
	__sync_fetch_and_add(&v->total, amount);
}

/* A vCPU thread became runnable: it waits from now (a later stamp replaces an earlier). */
static __always_inline void runnable(u32 tid, u32 zone_key, u64 now)
{
	struct zw_wait_state st = {.since_ns = now, .zone_key = zone_key};
	if (waiting.update(&tid, &st) != 0)
		count_lost(ZW_CLOST_STATE_FULL);
}

static __always_inline int on_wakeup(u32 tid)
{
	u32 *zone = zone_tids.lookup(&tid);
	if (zone)
		runnable(tid, *zone, bpf_ktime_get_ns());
	return 0;
}

#ifdef ZW_TP_sched_wakeup
TRACEPOINT_PROBE(sched, sched_wakeup)
{
	return on_wakeup(args->pid);
}
#endif

#ifdef ZW_TP_sched_wakeup_new
TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
	return on_wakeup(args->pid);
}
#endif

TRACEPOINT_PROBE(sched, sched_switch)
{
	u64 now = bpf_ktime_get_ns();
	int zero = 0;
	u64 *last = last_switch.lookup(&zero);
	u64 since = 0;
	if (last) {
		since = *last;
		*last = now;
	}

	/* The task leaving the CPU is `current`: its tgid says whether it is a zone's. */
	u64 id = bpf_get_current_pid_tgid();
	u32 prev = args->prev_pid;
	if (prev) {
		u32 tgid = id >> 32;
		u32 *zone = zone_pids.lookup(&tgid);
		if (zone) {
			u32 zone_key = *zone;
			int vcpu = zone_tids.lookup(&prev) != 0;
			if (since)
				add_total(zone_key, vcpu ? ZW_SCHED_VCPU_ONCPU : ZW_SCHED_OTHER_ONCPU,
					  now - since);
			if (vcpu && !(args->prev_state & ZW_TASK_SLEEP_BITS))
				runnable(prev, zone_key, now);
		}
	}

	/* The task getting the CPU: if it is a waiting vCPU thread, its wait ends now. */
	u32 next = args->next_pid;
	struct zw_wait_state *w = waiting.lookup(&next);
	if (w) {
		u64 delay = now - w->since_ns;
		u32 zone_key = w->zone_key;
		waiting.delete(&next);
		struct zw_hist_key key = {
			.zone_key = zone_key, .kind = ZW_HIST_RUN_DELAY, .slot = log2_slot(delay)};
		u64 zero64 = 0;
		u64 *n = hist.lookup_or_try_init(&key, &zero64);
		if (n)
			__sync_fetch_and_add(n, 1);
		else
			count_lost(ZW_CLOST_MAP_FULL);
		add_total(zone_key, ZW_SCHED_RUN_DELAY, delay);
	}
	return 0;
}

/* A reused pid or tid must never inherit a dead zone: forget threads the moment they exit. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	u32 tgid = id >> 32;
	zone_tids.delete(&tid);
	waiting.delete(&tid);
	if (tid == tgid)
		zone_pids.delete(&tgid);
	return 0;
}
