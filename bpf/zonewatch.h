/* zonewatch: the wire contract between the BPF programs and user space.
 *
 * Every record starts with struct zw_hdr; `type` says which struct follows. A record's
 * layout never depends on build flags: unused fields are zero. The Python mirror lives in
 * zonewatch/probes/records.py and tests/integration/test_records_layout.py checks it
 * against this file as compiled.
 */
#ifndef ZONEWATCH_H
#define ZONEWATCH_H

#define ZW_COMM_LEN 16
#define ZW_PATH_MAX 256

/* Record types (zw_hdr.type). */
enum zw_record_type {
	ZW_REC_FILE = 1,
	ZW_REC_KVM = 2,  /* struct zw_kvm_event (bpf/kvm.c) */
	ZW_REC_NET = 3,  /* struct zw_net_event (bpf/net.c) */
	ZW_REC_PROC = 4, /* struct zw_proc_event (bpf/proc.c) */
};

/* File operations (zw_file_event.op). */
enum zw_file_op {
	ZW_FILE_OPEN = 1,     /* openat/openat2/open/creat; fd in `ret` */
	ZW_FILE_MKDIR = 2,
	ZW_FILE_UNLINK = 3,   /* unlinkat with AT_REMOVEDIR in `flags` is an rmdir */
	ZW_FILE_RMDIR = 4,
	ZW_FILE_RENAME = 5,
	ZW_FILE_LINK = 6,
	ZW_FILE_SYMLINK = 7,  /* `path` is the link's target text, `path2` the new link */
	ZW_FILE_CHMOD = 8,
	ZW_FILE_CHOWN = 9,
	ZW_FILE_TRUNCATE = 10,
	ZW_FILE_SETXATTR = 11, /* `path2` holds the attribute name */
	ZW_FILE_MKNOD = 12,
	ZW_FILE_READ = 13,    /* first successful read of an open period */
	ZW_FILE_WRITE = 14,   /* first successful write of an open period */
	ZW_FILE_CLOSE = 15,   /* close of a tracked fd that saw I/O; totals in bytes_* */
};

/* Sources of loss (index into the `lost` per-CPU array). */
enum zw_lost_source {
	ZW_LOST_RINGBUF = 0,  /* ring buffer full: the record was dropped */
	ZW_LOST_PENDING = 1,  /* no room to stash a syscall's arguments until its exit */
	ZW_LOST_NSOURCES = 2,
};

struct zw_hdr {
	__u16 type;
	__u16 size;       /* bytes of the whole record */
	__u32 zone_key;   /* the zone the kernel attributed the record to */
	__u64 ts_ns;      /* CLOCK_MONOTONIC */
	__u32 pid;        /* tgid */
	__u32 tid;
	char comm[ZW_COMM_LEN];
};

struct zw_file_event {
	struct zw_hdr hdr;
	__u32 op;
	__s32 dirfd;      /* dirfd of `path` (AT_FDCWD = -100), or the fd for fd-based ops */
	__s32 dirfd2;     /* dirfd of `path2` */
	__u32 mode;
	__s64 ret;        /* syscall return: fd for opens, bytes for read/write, -errno */
	__u64 flags;      /* open flags, AT_* flags, RENAME_* flags */
	__u64 bytes_read;
	__u64 bytes_written;
	char path[ZW_PATH_MAX];
	char path2[ZW_PATH_MAX];
};

/* Key and value of the per-fd table that counts I/O in the kernel. */
struct zw_fd_key {
	__u32 pid;
	__s32 fd;
};

struct zw_fd_state {
	__u64 bytes_read;
	__u64 bytes_written;
	__u32 zone_key;
	__u32 _pad;
};

/* ==== kvm and sched channels (bpf/kvm.c, bpf/sched.c) ====
 *
 * These channels count in kernel maps; user space reads the maps in batches. The key and
 * value structs of those maps are part of the wire contract too, so they live here.
 */

/* Sources of loss of the counting channels (index into their `lost` per-CPU arrays). */
enum zw_count_lost_source {
	ZW_CLOST_RINGBUF = 0,      /* ring buffer full: a sampled record was dropped */
	ZW_CLOST_MAP_FULL = 1,     /* a counter map was full: the increment was dropped */
	ZW_CLOST_RATE_LIMITED = 2, /* over the zone's sample budget: counted, not sent */
	ZW_CLOST_STATE_FULL = 3,   /* no room for a thread's timestamps: a latency was missed */
	ZW_CLOST_NSOURCES = 4,
};

/* Sampled kvm records (zw_kvm_event.op): rare and telling, rate-limited per zone. */
enum zw_kvm_op {
	ZW_KVM_HYPERCALL = 1,     /* KVM hypercall: code = nr, args = a0..a3 */
	ZW_KVM_HV_HYPERCALL = 2,  /* Hyper-V hypercall: code = call code, args = ingpa, outgpa,
				     rep_cnt, var_cnt; flags ZW_KVM_F_FAST */
	ZW_KVM_XEN_HYPERCALL = 3, /* Xen hypercall: code = nr, args = a0..a5 */
	ZW_KVM_MSR_WRITE = 4,     /* guest WRMSR: code = MSR index, args[0] = value;
				     flags ZW_KVM_F_FAULT when it raised #GP */
};

#define ZW_KVM_F_FAULT 1
#define ZW_KVM_F_FAST 2

/* Kinds of the kvm `counters` map (zw_kvm_ctr_key.kind); `code` says which one. */
enum zw_kvm_counter {
	ZW_KVM_CTR_HYPERCALL = 1,       /* code: hypercall nr */
	ZW_KVM_CTR_MSR_READ = 2,        /* code: MSR index */
	ZW_KVM_CTR_MSR_WRITE = 3,       /* code: MSR index */
	ZW_KVM_CTR_MSR_READ_GP = 4,     /* code: MSR index; the access raised #GP */
	ZW_KVM_CTR_MSR_WRITE_GP = 5,    /* code: MSR index; the access raised #GP */
	ZW_KVM_CTR_EMULATE = 6,         /* code: 0 (kvm_emulate_insn, folded per thread) */
	ZW_KVM_CTR_EMULATE_FAILED = 7,  /* code: 0 */
	ZW_KVM_CTR_CPUID = 8,           /* code: CPUID leaf */
	ZW_KVM_CTR_HV_HYPERCALL = 9,    /* code: Hyper-V call code */
	ZW_KVM_CTR_XEN_HYPERCALL = 10,  /* code: Xen hypercall nr */
};

/* MMIO access kinds (zw_kvm_mmio_key.access): the kvm_mmio `type` values, plus fast MMIO. */
enum zw_kvm_mmio_access {
	ZW_KVM_MMIO_UNSATISFIED_READ = 0, /* a read that has to go to user space */
	ZW_KVM_MMIO_READ = 1,
	ZW_KVM_MMIO_WRITE = 2,
	ZW_KVM_MMIO_FAST_WRITE = 3,       /* kvm_fast_mmio: an ioeventfd write, no user exit */
};

/* Log2 histogram kinds (zw_hist_key.kind). */
enum zw_hist_kind {
	ZW_HIST_KVM_EXIT = 1,       /* kvm_exit -> next kvm_entry of the vCPU thread, ns */
	ZW_HIST_KVM_USERSPACE = 2,  /* kvm_userspace_exit -> the thread's next KVM_RUN, ns */
	ZW_HIST_RUN_DELAY = 3,      /* vCPU thread runnable (woken/preempted) -> running, ns */
};

/* Kinds of the sched `totals` map (zw_sched_key.kind). */
enum zw_sched_total {
	ZW_SCHED_RUN_DELAY = 1,    /* count: waits, total: ns waited by vCPU threads */
	ZW_SCHED_VCPU_ONCPU = 2,   /* count: slices, total: ns on CPU of vCPU threads */
	ZW_SCHED_OTHER_ONCPU = 3,  /* count: slices, total: ns on CPU of the zone's other threads */
};

struct zw_kvm_event {
	struct zw_hdr hdr;
	__u32 op;         /* enum zw_kvm_op */
	__u32 flags;      /* ZW_KVM_F_* */
	__u64 code;       /* hypercall number / call code, or MSR index */
	__u64 args[6];    /* see enum zw_kvm_op; unused ones are zero */
};

/* A count and a running total (bytes for I/O, ns for time). */
struct zw_sum {
	__u64 count;
	__u64 total;
};

struct zw_kvm_exit_key {
	__u32 zone_key;
	__u32 vcpu_id;    /* KVM's vCPU index (kvm_exit's vcpu_id; 0 on kernels without it) */
	__u32 reason;     /* exit_reason as the hardware gives it (VMX flags in the high bits) */
	__u32 isa;        /* 1 = VMX, 2 = SVM (KVM_ISA_*) */
};

struct zw_kvm_uexit_key {
	__u32 zone_key;
	__u32 reason;     /* kvm_run.exit_reason: KVM_EXIT_* */
	__u32 err;        /* 0, or the errno KVM_RUN failed with (EINTR for a signal) */
	__u32 _pad;
};

/* Ports, MMIO pages and counter codes are the guest's to choose, so each zone makes at
 * most ZW_KVM_KEYS_PER_ZONE keys of each; past that, its new ones are counted together
 * in one key with this flag (port, page or code 0). See bpf/kvm.c new_key(). */
#define ZW_KVM_KEY_OTHER 1

struct zw_kvm_pio_key {
	__u32 zone_key;
	__u16 port;
	__u8 dir;         /* 0 in, 1 out (KVM_PIO_IN/OUT) */
	__u8 flags;       /* ZW_KVM_KEY_OTHER */
};

struct zw_kvm_mmio_key {
	__u32 zone_key;
	__u16 access;     /* enum zw_kvm_mmio_access */
	__u16 flags;      /* ZW_KVM_KEY_OTHER */
	__u64 page;       /* guest-physical address & ~0xfff */
};

struct zw_kvm_ctr_key {
	__u32 zone_key;
	__u16 kind;       /* enum zw_kvm_counter */
	__u16 flags;      /* ZW_KVM_KEY_OTHER */
	__u64 code;
};

struct zw_hist_key {
	__u32 zone_key;
	__u16 kind;       /* enum zw_hist_kind */
	__u16 slot;       /* 0: value 0; s >= 1: [2^(s-1), 2^s); capped at ZW_HIST_SLOTS - 1 */
};

struct zw_sched_key {
	__u32 zone_key;
	__u32 kind;       /* enum zw_sched_total */
};

/* Log2 histogram slots: the last one also holds everything larger (2^46 ns is ~20 h). */
#define ZW_HIST_SLOTS 48

/* Per vCPU thread state of bpf/kvm.c (tid -> state): timestamps, and the thread's share of
 * the hottest counters, kept here so that each event costs one lookup. The thread's
 * counts are folded into the per-zone maps (`counters`, `hist`) when it exits; until then
 * user space adds them up from this map. */
/* zw_vcpu_state.flags */
#define ZW_VCPU_ENTERED 1  /* kvm_entry fired for this thread (it never does under nested PVM) */

struct zw_vcpu_state {
	__u64 exit_ts;    /* last kvm_exit not yet followed by kvm_entry; 0 when none */
	__u64 uexit_ts;   /* last return to user space not yet followed by KVM_RUN; 0 when none */
	__u32 zone_key;
	__u32 flags;      /* ZW_VCPU_* */
	__u64 emulated;        /* kvm_emulate_insn */
	__u64 emulate_failed;  /* kvm_emulate_insn that failed */
	__u64 exit_lat[ZW_HIST_SLOTS];  /* kvm_exit -> kvm_entry, by log2 slot of ns */
	__u64 user_lat[ZW_HIST_SLOTS];  /* kvm_userspace_exit -> next KVM_RUN, by slot */
};

/* Per vCPU thread run-queue stamp of bpf/sched.c (tid -> state). */
struct zw_wait_state {
	__u64 since_ns;   /* became runnable (woken, or preempted while runnable) */
	__u32 zone_key;
	__u32 _pad;
};

/* ==== net channel (bpf/net.c) ====
 *
 * tc programs on each zone's tap (and, where the tap's owner left no egress hook, on the
 * device that redirects to it). A flow is keyed from the zone's point of view
 * (local = the zone's end), so a connection and its replies are one flow. Packets are
 * guest-controlled: whatever does not parse is counted in zw_net_counters, never trusted.
 */

#define ZW_DNS_MAX 512  /* a power of 2; up to ZW_DNS_MAX - 1 bytes of a DNS query are copied */

/* Direction of a packet, from the zone's point of view (index into the [2] arrays - 1). */
enum zw_net_dir {
	ZW_NET_EGRESS = 1,   /* the zone sent it (tc ingress on the host's tap) */
	ZW_NET_INGRESS = 2,  /* sent to the zone (tc egress on the host's tap, or the ingress of
				the device redirecting to it) */
};

/* What a net record reports (zw_net_event.op). */
enum zw_net_op {
	ZW_NET_FLOW_START = 1,  /* the first packet of a flow the table did not hold */
	ZW_NET_FLOW_END = 2,    /* TCP FIN both ways, or RST (idle flows end in user space) */
	ZW_NET_DNS = 3,         /* a DNS query (UDP to port 53, QR clear): message in `dns` */
};

/* zw_flow_stats.state bits. */
#define ZW_FLOW_FIN_EGRESS 1   /* the zone sent a FIN */
#define ZW_FLOW_FIN_INGRESS 2  /* the zone was sent a FIN */
#define ZW_FLOW_ENDED 4        /* a FLOW_END record was sent for this flow */

struct zw_flow_key {
	__u32 zone_key;
	__u8 family;        /* 4 or 6 */
	__u8 proto;         /* IPPROTO_*: TCP, UDP, ICMP, ICMPV6, or another (ports 0) */
	__u16 local_port;   /* the zone's end, host order; ICMP echo: the identifier */
	__u16 remote_port;  /* ICMP other than echo: type << 8 | code */
	__u16 _pad;
	__u8 local_ip[16];  /* IPv4 in the first 4 bytes, the rest zero */
	__u8 remote_ip[16];
};

/* A flow's totals; [0] is what the zone sent, [1] what it was sent. */
struct zw_flow_stats {
	__u64 first_ns;     /* CLOCK_MONOTONIC */
	__u64 last_ns;
	__u64 bytes[2];     /* IP bytes, headers included */
	__u64 packets[2];
	__u64 payload[2];   /* L4 payload bytes (TCP/UDP data, ICMP after its 8-byte header) */
	__u32 ifindex;      /* the zone's tap (in its network namespace) */
	__u32 initiator;    /* enum zw_net_dir of the first packet seen */
	__u64 tcp_flags;    /* every TCP flag seen, OR-ed (64 bits: bcc's BPF has 64-bit atomics) */
	__u64 state;        /* ZW_FLOW_* bits */
};

/* A watched device (zone_ifs key): taps of different zones share names and ifindexes (every
 * Kata pod's is `tap0_kata`), so the device's network namespace is part of its name. */
struct zw_net_if_key {
	__u64 netns;      /* the namespace's inode number, as patched into the program instance
			     attached there (ZW_NETNS_UNPATCHED where user space could not patch) */
	__u32 ifindex;
	__u32 _pad;
};

/* The value netns_id() (bpf/net.c) returns until user space patches its instance: chosen
 * to occur nowhere else in the program's instructions. */
#define ZW_NETNS_UNPATCHED 0x5A57A5A5D1CEC0DEULL

/* A watched device's zone, the zone's slot in `counters`, and the tap its frames are the
 * zone's traffic on (the device itself, or the tap it redirects to). */
struct zw_net_if {
	__u32 zone_key;
	__u32 slot;
	__u32 tap_ifindex;
	__u32 _pad;
};

/* A zone's packet counters (per-CPU array, at the zone's slot); [0]/[1] as in
 * zw_flow_stats. */
struct zw_net_counters {
	__u64 bytes[2];     /* frame bytes, L2 header included */
	__u64 packets[2];
	__u64 new_flows;
	__u64 dns_queries;
	__u64 malformed;    /* headers that contradict themselves (version, IHL, lengths, offsets) */
	__u64 truncated;    /* headers cut short by the end of the frame */
	__u64 fragments;    /* IP fragments: counted, not parsed into flows */
	__u64 other;        /* neither IPv4 nor IPv6 (ARP, VLAN-tagged), or IPv6 extension
			       chains longer than the program walks */
};

struct zw_net_event {
	struct zw_hdr hdr;  /* pid, tid, comm: zero (packets have no process here) */
	__u32 op;           /* enum zw_net_op */
	__u16 dir;          /* enum zw_net_dir of the packet that made the record */
	__u16 dns_len;      /* bytes of `dns` filled (the UDP payload, at most ZW_DNS_MAX - 1) */
	struct zw_flow_key key;
	__u32 _pad;
	struct zw_flow_stats flow;  /* the flow's totals when the record was made */
	__u8 dns[ZW_DNS_MAX];       /* ZW_NET_DNS: the message from its header on; else zero */
};

/* ==== proc channel (bpf/proc.c) ====
 *
 * What a zone's VMM and backend processes (and every process they spawn, followed by the
 * kernel) do themselves. Rare by nature: one record per call.
 */

#define ZW_ARGS_MAX 512  /* argv bytes of an exec (NUL-separated); the upper half is slack
			    that keeps the verifier's bounds simple */

enum zw_proc_op {
	ZW_PROC_EXEC = 1,        /* path: the file run; args: argv when the execve entry was seen */
	ZW_PROC_FORK = 2,        /* target_pid: the new process (threads are not reported);
				    arg[0]: clone flags (CLONE_NEW*: new namespaces) */
	ZW_PROC_EXIT = 3,        /* ret: the exit_group status (0 when the entry was not seen) */
	ZW_PROC_PTRACE = 4,      /* target_pid: pid; arg[0]: request */
	ZW_PROC_MOUNT = 5,       /* path: mount point; path2: source; args: fstype; arg[0]: flags */
	ZW_PROC_SETUID = 6,      /* arg[0..2]: real, effective, saved uid asked (-1: unchanged) */
	ZW_PROC_SETGID = 7,      /* arg[0..2]: real, effective, saved gid asked */
	ZW_PROC_CAPSET = 8,      /* arg[0..2]: effective, permitted, inheritable (64-bit sets) */
	ZW_PROC_MODULE_LOAD = 9, /* init_module: arg[0] image bytes; finit_module: arg[1] fd;
				    path2: module parameters */
	ZW_PROC_BPF = 10,        /* arg[0]: the bpf() command */
	ZW_PROC_MEMFD = 11,      /* path: the memfd's name; arg[0]: flags */
	ZW_PROC_CONNECT = 12,    /* arg[0]: family; arg[1]: port; addr: IPv4/IPv6 bytes;
				    path: AF_UNIX path (a leading NUL: abstract) */
	ZW_PROC_BIND = 13,       /* as connect */
	ZW_PROC_MOVE_MOUNT = 14, /* path: target path; path2: source path */
	/* Escape indicators: each is an attempt, recorded at the call's entry with its return. */
	ZW_PROC_SETNS = 15,      /* arg[0]: nstype (CLONE_NEW* or 0); arg[1]: the fd */
	ZW_PROC_UNSHARE = 16,    /* arg[0]: unshare flags (CLONE_NEW* ...) */
	ZW_PROC_CHROOT = 17,     /* path: the new root */
	ZW_PROC_PIVOT_ROOT = 18, /* path: new_root; path2: put_old */
	ZW_PROC_OPEN_BY_HANDLE = 19, /* arg[0]: open flags; arg[1]: mount fd;
					arg[2]: handle_type << 32 | handle_bytes */
	ZW_PROC_PROCESS_VM_READV = 20,  /* target_pid: pid; arg[0]: local iovecs;
					   arg[1]: remote iovecs; arg[2]: flags; ret: bytes */
	ZW_PROC_PROCESS_VM_WRITEV = 21, /* as process_vm_readv */
	ZW_PROC_PIDFD_GETFD = 22,   /* arg[0]: the pidfd; arg[1]: the fd taken; arg[2]: flags */
	ZW_PROC_IO_URING_SETUP = 23, /* arg[0]: entries; arg[1]: io_uring_params.flags */
	ZW_PROC_USERFAULTFD = 24,   /* arg[0]: flags */
	ZW_PROC_KEXEC_LOAD = 25,    /* arg[0]: flags; arg[1]: segments; arg[2]: entry */
	ZW_PROC_PERF_EVENT_OPEN = 26, /* target_pid: pid (-1: any); arg[0]: attr.type;
					 arg[1]: attr.config; arg[2]: flags */
	ZW_PROC_KEXEC_FILE_LOAD = 27, /* arg[0]: flags; arg[1]: kernel fd; path2: command line */
};

#define ZW_PROC_F_SPAWNED 1  /* the process was spawned by a zone process (followed) */

struct zw_proc_event {
	struct zw_hdr hdr;
	__u32 op;            /* enum zw_proc_op */
	__u32 flags;         /* ZW_PROC_F_* */
	__s64 ret;           /* the call's return (-errno), or the exit status */
	__u32 ppid;          /* the parent's tgid when the kernel followed the fork, else 0 */
	__u32 target_pid;    /* fork: the child; ptrace, process_vm_*, perf_event_open: the pid */
	__u64 arg[3];        /* see enum zw_proc_op; unused ones are zero */
	__u8 addr[16];       /* connect/bind: the address (4 bytes for IPv4) */
	__u32 args_len;      /* bytes of `args` filled */
	__u32 _pad;
	char pcomm[ZW_COMM_LEN];  /* the parent's comm when followed */
	char path[ZW_PATH_MAX];
	char path2[ZW_PATH_MAX];
	char args[ZW_ARGS_MAX];
};

/* Value of the proc channel's `spawned` map: a followed process's parent. */
struct zw_proc_parent {
	__u32 ppid;
	__u32 _pad;
	char pcomm[ZW_COMM_LEN];
};

#endif /* ZONEWATCH_H */
