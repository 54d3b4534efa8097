/* zonewatch proc channel: what zones' VMM and backend processes do themselves.
 *
 * Two halves:
 * - scheduler and task tracepoints (exec, fork, exit): they fire only on those events and
 *   cost unrelated syscalls nothing;
 * - syscall tracepoints (ptrace, mount, set*id, capset, module loads, bpf, memfd_create,
 *   connect, bind; the escape indicators setns, unshare, chroot, pivot_root,
 *   open_by_handle_at, process_vm_readv/writev, pidfd_getfd, io_uring_setup, userfaultfd,
 *   kexec_load, perf_event_open; execve entries for argv; exit_group for the status), each behind
 *   -DZW_TP_<name> set by the loader, and all of them off with --no-proc-syscalls: any
 *   syscall tracepoint moves every syscall on the host onto the traced slow path.
 *
 * Every probe looks the current tgid up in zone_pids first. Processes a zone process spawns
 * are followed in the kernel: task_newtask adds the child to zone_pids before it runs (so
 * a VMM that starts a shell can't outrun the filter) and notes its parent in `spawned`.
 * task_newtask rather than sched_process_fork: only it has clone_flags, the one way to tell
 * a new process from a new thread without reading task_struct.
 */
#include <uapi/linux/capability.h>  /* capset's tracepoint format names its types */
#include "zonewatch.h"

#ifndef ZW_MAX_ZONE_PIDS
#define ZW_MAX_ZONE_PIDS 16384
#endif
#ifndef ZW_RINGBUF_PAGES
#define ZW_RINGBUF_PAGES 64
#endif
#define ZW_ARGV_MAX 16            /* argv entries copied per exec */
#define ZW_ARG_CHUNK (ZW_ARGS_MAX / 2)
#define ZW_CLONE_THREAD 0x00010000
#define ZW_AF_UNIX 1
#define ZW_AF_INET 2
#define ZW_AF_INET6 10
#define ZW_UNIX_PATH_MAX 108

BPF_HASH(zone_pids, u32, u32, ZW_MAX_ZONE_PIDS);                  /* tgid -> zone key */
BPF_HASH(spawned, u32, struct zw_proc_parent, ZW_MAX_ZONE_PIDS);  /* followed tgid -> parent */
BPF_HASH(pending, u32, struct zw_proc_event, 1024);               /* tid -> stashed call */
BPF_HASH(exit_status, u32, s32, 1024);                            /* tgid -> exit_group arg */
BPF_PERCPU_ARRAY(scratch, struct zw_proc_event, 1);
BPF_ARRAY(blank, struct zw_proc_event, 1);                         /* all zero, always */
BPF_PERCPU_ARRAY(lost, u64, ZW_CLOST_NSOURCES);
BPF_RINGBUF_OUTPUT(events, ZW_RINGBUF_PAGES);

static __always_inline void count_lost(int source)
{
	u64 *n = lost.lookup(&source);
	if (n)
		(*n)++;
}

static __always_inline struct zw_proc_event *fresh_record(u32 zone_key, u32 op)
{
	int zero = 0;
	struct zw_proc_event *e = scratch.lookup(&zero);
	if (!e)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	/* Copied from a never-written entry: clang lowers a memset this large to a call BPF
	 * cannot make. */
	struct zw_proc_event *zeroes = blank.lookup(&zero);
	if (!zeroes)
		return 0;
	bpf_probe_read_kernel(e, sizeof(*e), zeroes);
	e->hdr.type = ZW_REC_PROC;
	e->hdr.size = sizeof(*e);
	e->hdr.zone_key = zone_key;
	e->hdr.ts_ns = bpf_ktime_get_ns();
	e->hdr.pid = tgid;
	e->hdr.tid = (u32)id;
	bpf_get_current_comm(&e->hdr.comm, sizeof(e->hdr.comm));
	e->op = op;
	struct zw_proc_parent *parent = spawned.lookup(&tgid);
	if (parent) {
		e->flags |= ZW_PROC_F_SPAWNED;
		e->ppid = parent->ppid;
		__builtin_memcpy(e->pcomm, parent->pcomm, sizeof(e->pcomm));
	}
	return e;
}

/* A record of the current process if it belongs to a zone, else 0. */
static __always_inline struct zw_proc_event *zone_record(u32 op)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	u32 *zone = zone_pids.lookup(&tgid);
	if (!zone)
		return 0;
	return fresh_record(*zone, op);
}

static __always_inline void submit(struct zw_proc_event *e)
{
	if (events.ringbuf_output(e, sizeof(*e), 0) != 0)
		count_lost(ZW_CLOST_RINGBUF);
}

/* Entry of a call reported with its result: keep the record until the call returns. */
static __always_inline void stash(struct zw_proc_event *e)
{
	u32 tid = e->hdr.tid;
	if (pending.update(&tid, e) != 0)
		count_lost(ZW_CLOST_STATE_FULL);
}

/* Exit of a stashed call: emit it with the result. */
static __always_inline int call_exit(long ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct zw_proc_event *e = pending.lookup(&tid);
	if (!e)
		return 0;
	e->ret = ret;
	submit(e);
	pending.delete(&tid);
	return 0;
}

/* ---- exec, fork, exit: no syscall tracepoints needed ---- */

TRACEPOINT_PROBE(task, task_newtask)
{
	if (args->clone_flags & ZW_CLONE_THREAD)
		return 0;  /* a thread of a zone process is that process */
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	u32 *zone = zone_pids.lookup(&tgid);
	if (!zone)
		return 0;
	u32 key = *zone;
	u32 child = args->pid;
	struct zw_proc_parent parent = {.ppid = tgid};
	bpf_get_current_comm(&parent.pcomm, sizeof(parent.pcomm));
	if (zone_pids.update(&child, &key) != 0) {
		count_lost(ZW_CLOST_MAP_FULL);  /* the child escapes the filter: say so */
	} else {
		spawned.update(&child, &parent);
	}
	struct zw_proc_event *e = fresh_record(key, ZW_PROC_FORK);
	if (!e)
		return 0;
	e->target_pid = child;
	e->arg[0] = args->clone_flags;  /* CLONE_NEW*: the child starts in new namespaces */
	submit(e);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_EXEC);
	if (!e)
		return 0;
	/* The entry stashed argv under the thread that called execve (old_pid). */
	u32 old = args->old_pid;
	struct zw_proc_event *entry = pending.lookup(&old);
	if (entry && entry->op == ZW_PROC_EXEC) {
		__builtin_memcpy(e->args, entry->args, sizeof(e->args));
		e->args_len = entry->args_len;
		pending.delete(&old);
	}
	TP_DATA_LOC_READ_STR(e->path, filename, sizeof(e->path));
	submit(e);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
#ifdef ZW_EXIT_GROUP_DEAD
	if (!args->group_dead)
		return 0;  /* other threads still run in the process */
#else
	if ((u32)id != tgid)
		return 0;
#endif
	u32 *zone = zone_pids.lookup(&tgid);
	if (!zone)
		return 0;
	struct zw_proc_event *e = fresh_record(*zone, ZW_PROC_EXIT);
	if (e) {
		s32 *status = exit_status.lookup(&tgid);
		if (status)
			e->ret = *status;
		submit(e);
	}
	/* A reused pid must never inherit a dead zone. */
	zone_pids.delete(&tgid);
	spawned.delete(&tgid);
	exit_status.delete(&tgid);
	return 0;
}

/* ---- the syscall half ---- */

#define EXIT_PROBE(name) \
	TRACEPOINT_PROBE(syscalls, sys_exit_##name) { return call_exit(args->ret); }

#ifdef ZW_TP_sys_enter_exit_group
TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!zone_pids.lookup(&tgid))
		return 0;
	s32 status = args->error_code;
	exit_status.update(&tgid, &status);
	return 0;
}
#endif

static __always_inline void read_argv(struct zw_proc_event *e, const char *const *argv)
{
	u32 off = 0;
#pragma unroll
	for (int i = 0; i < ZW_ARGV_MAX; i++) {
		const char *arg = 0;
		if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) != 0 || !arg)
			break;
		if (off >= ZW_ARG_CHUNK)
			break;
		/* off < ZW_ARG_CHUNK and a chunk at most: always inside args. */
		long n = bpf_probe_read_user_str(&e->args[off & (ZW_ARG_CHUNK - 1)], ZW_ARG_CHUNK, arg);
		if (n <= 0)
			break;
		off += n;
	}
	e->args_len = off;
}

static __always_inline int exec_enter(const char *const *argv)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_EXEC);
	if (!e)
		return 0;
	read_argv(e, argv);
	stash(e);
	return 0;
}

/* A failed exec leaves its stash behind: drop it (sched_process_exec took the others). */
static __always_inline int exec_exit(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	pending.delete(&tid);
	return 0;
}

#ifdef ZW_TP_execve
TRACEPOINT_PROBE(syscalls, sys_enter_execve) { return exec_enter(args->argv); }
TRACEPOINT_PROBE(syscalls, sys_exit_execve) { return exec_exit(); }
#endif
#ifdef ZW_TP_execveat
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) { return exec_enter(args->argv); }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { return exec_exit(); }
#endif

#ifdef ZW_TP_ptrace
TRACEPOINT_PROBE(syscalls, sys_enter_ptrace)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_PTRACE);
	if (!e)
		return 0;
	e->target_pid = args->pid;
	e->arg[0] = args->request;
	stash(e);
	return 0;
}
EXIT_PROBE(ptrace)
#endif

#ifdef ZW_TP_mount
TRACEPOINT_PROBE(syscalls, sys_enter_mount)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_MOUNT);
	if (!e)
		return 0;
	bpf_probe_read_user_str(e->path, sizeof(e->path), args->dir_name);
	if (args->dev_name)
		bpf_probe_read_user_str(e->path2, sizeof(e->path2), args->dev_name);
	if (args->type) {
		long n = bpf_probe_read_user_str(e->args, ZW_ARG_CHUNK, args->type);
		e->args_len = n > 0 ? n : 0;
	}
	e->arg[0] = args->flags;
	stash(e);
	return 0;
}
EXIT_PROBE(mount)
#endif

#ifdef ZW_TP_move_mount
TRACEPOINT_PROBE(syscalls, sys_enter_move_mount)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_MOVE_MOUNT);
	if (!e)
		return 0;
	bpf_probe_read_user_str(e->path, sizeof(e->path), args->to_pathname);
	bpf_probe_read_user_str(e->path2, sizeof(e->path2), args->from_pathname);
	e->arg[0] = args->flags;
	stash(e);
	return 0;
}
EXIT_PROBE(move_mount)
#endif

/* ---- credentials: ids asked for, (u32)-1 where the call leaves one unchanged, (u32)-2
 * where the kernel's rules for setuid/setreuid decide (they may set the saved id, or all
 * three): only setresuid/setresgid with real and saved -1 switch the effective id alone ---- */
static __always_inline int ids_enter(u32 op, u32 real, u32 eff, u32 saved)
{
	struct zw_proc_event *e = zone_record(op);
	if (!e)
		return 0;
	e->arg[0] = real;
	e->arg[1] = eff;
	e->arg[2] = saved;
	stash(e);
	return 0;
}

#define UNCHANGED ((u32)-1)
#define IMPLIED ((u32)-2)
#ifdef ZW_TP_setuid
TRACEPOINT_PROBE(syscalls, sys_enter_setuid)
{
	return ids_enter(ZW_PROC_SETUID, args->uid, IMPLIED, IMPLIED);
}
EXIT_PROBE(setuid)
#endif
#ifdef ZW_TP_setreuid
TRACEPOINT_PROBE(syscalls, sys_enter_setreuid)
{
	return ids_enter(ZW_PROC_SETUID, args->ruid, args->euid, IMPLIED);
}
EXIT_PROBE(setreuid)
#endif
#ifdef ZW_TP_setresuid
TRACEPOINT_PROBE(syscalls, sys_enter_setresuid)
{
	return ids_enter(ZW_PROC_SETUID, args->ruid, args->euid, args->suid);
}
EXIT_PROBE(setresuid)
#endif
#ifdef ZW_TP_setgid
TRACEPOINT_PROBE(syscalls, sys_enter_setgid)
{
	return ids_enter(ZW_PROC_SETGID, args->gid, IMPLIED, IMPLIED);
}
EXIT_PROBE(setgid)
#endif
#ifdef ZW_TP_setregid
TRACEPOINT_PROBE(syscalls, sys_enter_setregid)
{
	return ids_enter(ZW_PROC_SETGID, args->rgid, args->egid, IMPLIED);
}
EXIT_PROBE(setregid)
#endif
#ifdef ZW_TP_setresgid
TRACEPOINT_PROBE(syscalls, sys_enter_setresgid)
{
	return ids_enter(ZW_PROC_SETGID, args->rgid, args->egid, args->sgid);
}
EXIT_PROBE(setresgid)
#endif

#ifdef ZW_TP_capset
struct zw_cap_data {
	u32 effective;
	u32 permitted;
	u32 inheritable;
};

TRACEPOINT_PROBE(syscalls, sys_enter_capset)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_CAPSET);
	if (!e)
		return 0;
	/* Version 2 and 3 headers: two 32-bit halves of each set. */
	struct zw_cap_data data[2] = {};
	if (args->data)
		bpf_probe_read_user(&data, sizeof(data), (void *)args->data);
	e->arg[0] = data[0].effective | ((u64)data[1].effective << 32);
	e->arg[1] = data[0].permitted | ((u64)data[1].permitted << 32);
	e->arg[2] = data[0].inheritable | ((u64)data[1].inheritable << 32);
	stash(e);
	return 0;
}
EXIT_PROBE(capset)
#endif

/* ---- the kernel itself: modules, bpf() ---- */
#ifdef ZW_TP_init_module
TRACEPOINT_PROBE(syscalls, sys_enter_init_module)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_MODULE_LOAD);
	if (!e)
		return 0;
	e->arg[0] = args->len;
	bpf_probe_read_user_str(e->path2, sizeof(e->path2), args->uargs);
	stash(e);
	return 0;
}
EXIT_PROBE(init_module)
#endif
#ifdef ZW_TP_finit_module
TRACEPOINT_PROBE(syscalls, sys_enter_finit_module)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_MODULE_LOAD);
	if (!e)
		return 0;
	e->arg[1] = args->fd;
	e->arg[2] = args->flags;
	bpf_probe_read_user_str(e->path2, sizeof(e->path2), args->uargs);
	stash(e);
	return 0;
}
EXIT_PROBE(finit_module)
#endif

#ifdef ZW_TP_bpf
TRACEPOINT_PROBE(syscalls, sys_enter_bpf)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_BPF);
	if (!e)
		return 0;
	e->arg[0] = args->cmd;
	stash(e);
	return 0;
}
EXIT_PROBE(bpf)
#endif

#ifdef ZW_TP_memfd_create
TRACEPOINT_PROBE(syscalls, sys_enter_memfd_create)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_MEMFD);
	if (!e)
		return 0;
	bpf_probe_read_user_str(e->path, sizeof(e->path), args->uname);
	e->arg[0] = args->flags;
	stash(e);
	return 0;
}
EXIT_PROBE(memfd_create)
#endif

/* ---- sockets the process itself opens (the guest's traffic is the net channel's) ---- */
static __always_inline int sock_enter(u32 op, const void *uaddr, int len)
{
	struct zw_proc_event *e = zone_record(op);
	if (!e)
		return 0;
	u16 family = 0;
	if (uaddr && len >= 2)
		bpf_probe_read_user(&family, sizeof(family), uaddr);
	e->arg[0] = family;
	if (family == ZW_AF_INET && len >= 8) {
		u16 port = 0;
		bpf_probe_read_user(&port, sizeof(port), uaddr + 2);
		e->arg[1] = bpf_ntohs(port);
		bpf_probe_read_user(e->addr, 4, uaddr + 4);
	} else if (family == ZW_AF_INET6 && len >= 24) {
		u16 port = 0;
		bpf_probe_read_user(&port, sizeof(port), uaddr + 2);
		e->arg[1] = bpf_ntohs(port);
		bpf_probe_read_user(e->addr, 16, uaddr + 8);
	} else if (family == ZW_AF_UNIX && len > 2) {
		/* Fixed size, not a string: an abstract name starts with NUL. */
		bpf_probe_read_user(e->path, ZW_UNIX_PATH_MAX, uaddr + 2);
	}
	stash(e);
	return 0;
}

#ifdef ZW_TP_connect
TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	return sock_enter(ZW_PROC_CONNECT, args->uservaddr, args->addrlen);
}
EXIT_PROBE(connect)
#endif
#ifdef ZW_TP_bind
TRACEPOINT_PROBE(syscalls, sys_enter_bind)
{
	return sock_enter(ZW_PROC_BIND, args->umyaddr, args->addrlen);
}
EXIT_PROBE(bind)
#endif

/* ---- escape indicators: namespaces, roots, other processes, kernel interfaces ----
 * Each records the attempt at the call's entry and emits it with the return at its exit:
 * an EPERM or ENOSYS is as telling as a success. */

#ifdef ZW_TP_setns
TRACEPOINT_PROBE(syscalls, sys_enter_setns)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_SETNS);
	if (!e)
		return 0;
	e->arg[0] = (u32)args->flags;
	e->arg[1] = (u32)args->fd;
	stash(e);
	return 0;
}
EXIT_PROBE(setns)
#endif

#ifdef ZW_TP_unshare
TRACEPOINT_PROBE(syscalls, sys_enter_unshare)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_UNSHARE);
	if (!e)
		return 0;
	e->arg[0] = args->unshare_flags;
	stash(e);
	return 0;
}
EXIT_PROBE(unshare)
#endif

#ifdef ZW_TP_chroot
TRACEPOINT_PROBE(syscalls, sys_enter_chroot)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_CHROOT);
	if (!e)
		return 0;
	bpf_probe_read_user_str(e->path, sizeof(e->path), args->filename);
	stash(e);
	return 0;
}
EXIT_PROBE(chroot)
#endif

#ifdef ZW_TP_pivot_root
TRACEPOINT_PROBE(syscalls, sys_enter_pivot_root)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_PIVOT_ROOT);
	if (!e)
		return 0;
	bpf_probe_read_user_str(e->path, sizeof(e->path), args->new_root);
	bpf_probe_read_user_str(e->path2, sizeof(e->path2), args->put_old);
	stash(e);
	return 0;
}
EXIT_PROBE(pivot_root)
#endif

#ifdef ZW_TP_open_by_handle_at
TRACEPOINT_PROBE(syscalls, sys_enter_open_by_handle_at)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_OPEN_BY_HANDLE);
	if (!e)
		return 0;
	/* struct file_handle starts with u32 handle_bytes, int handle_type (uapi fcntl.h). */
	u32 head[2] = {};
	if (args->handle)
		bpf_probe_read_user(&head, sizeof(head), (void *)args->handle);
	e->arg[0] = (u32)args->flags;
	e->arg[1] = (u32)args->mountdirfd;
	e->arg[2] = ((u64)head[1] << 32) | head[0];
	stash(e);
	return 0;
}
EXIT_PROBE(open_by_handle_at)
#endif

static __always_inline int process_vm_enter(u32 op, u32 pid, u64 liovcnt, u64 riovcnt,
					    u64 flags)
{
	struct zw_proc_event *e = zone_record(op);
	if (!e)
		return 0;
	e->target_pid = pid;
	e->arg[0] = liovcnt;
	e->arg[1] = riovcnt;
	e->arg[2] = flags;
	stash(e);
	return 0;
}

#ifdef ZW_TP_process_vm_readv
TRACEPOINT_PROBE(syscalls, sys_enter_process_vm_readv)
{
	return process_vm_enter(ZW_PROC_PROCESS_VM_READV, args->pid, args->liovcnt,
				args->riovcnt, args->flags);
}
EXIT_PROBE(process_vm_readv)
#endif
#ifdef ZW_TP_process_vm_writev
TRACEPOINT_PROBE(syscalls, sys_enter_process_vm_writev)
{
	return process_vm_enter(ZW_PROC_PROCESS_VM_WRITEV, args->pid, args->liovcnt,
				args->riovcnt, args->flags);
}
EXIT_PROBE(process_vm_writev)
#endif

#ifdef ZW_TP_pidfd_getfd
TRACEPOINT_PROBE(syscalls, sys_enter_pidfd_getfd)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_PIDFD_GETFD);
	if (!e)
		return 0;
	e->arg[0] = (u32)args->pidfd;
	e->arg[1] = (u32)args->fd;
	e->arg[2] = args->flags;
	stash(e);
	return 0;
}
EXIT_PROBE(pidfd_getfd)
#endif

#ifdef ZW_TP_io_uring_setup
TRACEPOINT_PROBE(syscalls, sys_enter_io_uring_setup)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_IO_URING_SETUP);
	if (!e)
		return 0;
	/* struct io_uring_params: u32 sq_entries, cq_entries, flags, ... (uapi io_uring.h) */
	u32 params[3] = {};
	if (args->params)
		bpf_probe_read_user(&params, sizeof(params), (void *)args->params);
	e->arg[0] = args->entries;
	e->arg[1] = params[2];
	stash(e);
	return 0;
}
EXIT_PROBE(io_uring_setup)
#endif

#ifdef ZW_TP_userfaultfd
TRACEPOINT_PROBE(syscalls, sys_enter_userfaultfd)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_USERFAULTFD);
	if (!e)
		return 0;
	e->arg[0] = (u32)args->flags;
	stash(e);
	return 0;
}
EXIT_PROBE(userfaultfd)
#endif

#ifdef ZW_TP_kexec_load
TRACEPOINT_PROBE(syscalls, sys_enter_kexec_load)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_KEXEC_LOAD);
	if (!e)
		return 0;
	e->arg[0] = args->flags;
	e->arg[1] = args->nr_segments;
	e->arg[2] = args->entry;
	stash(e);
	return 0;
}
EXIT_PROBE(kexec_load)
#endif
#ifdef ZW_TP_kexec_file_load
TRACEPOINT_PROBE(syscalls, sys_enter_kexec_file_load)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_KEXEC_FILE_LOAD);
	if (!e)
		return 0;
	e->arg[0] = args->flags;
	e->arg[1] = (u32)args->kernel_fd;
	if (args->cmdline_ptr)
		bpf_probe_read_user_str(e->path2, sizeof(e->path2), args->cmdline_ptr);
	stash(e);
	return 0;
}
EXIT_PROBE(kexec_file_load)
#endif

#ifdef ZW_TP_perf_event_open
TRACEPOINT_PROBE(syscalls, sys_enter_perf_event_open)
{
	struct zw_proc_event *e = zone_record(ZW_PROC_PERF_EVENT_OPEN);
	if (!e)
		return 0;
	/* struct perf_event_attr: u32 type, u32 size, u64 config, ... (uapi perf_event.h) */
	u64 attr[2] = {};
	if (args->attr_uptr)
		bpf_probe_read_user(&attr, sizeof(attr), (void *)args->attr_uptr);
	e->target_pid = (u32)args->pid;
	e->arg[0] = (u32)attr[0];
	e->arg[1] = attr[1];
	e->arg[2] = args->flags;
	stash(e);
	return 0;
}
EXIT_PROBE(perf_event_open)
#endif
