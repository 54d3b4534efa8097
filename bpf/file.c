/* zonewatch file channel: file operations that zones' backend processes (QEMU's 9p server,
 * virtiofsd) make on the guest's behalf.
 *
 * Two ways to hook them, one chosen at build time; the maps, helpers and records are
 * shared (bcc rewrites map accesses in the main file only, hence one file, not a header):
 *
 * - syscall tracepoints (the default, `zonewatch run --file-hooks tracepoints`): a raw
 *   syscall cannot bypass them, but attaching any syscall tracepoint moves every syscall
 *   of every process on the host onto the traced slow path. Each probe is compiled only
 *   when its tracepoint exists (-DZW_TP_<name>, set by the loader), so one source serves
 *   kernels with and without e.g. fchmodat2.
 * - -DZW_FILE_UPROBES (`--file-hooks uprobes`): uprobes and uretprobes on the libc
 *   wrappers the backends call, attached per backend process by zonewatch/probes/uprobes.py.
 *   A uprobe bound to one process costs that process only, and only on the calls it hooks.
 *   The price: a compromised backend can bypass libc with a raw syscall (so can libc's
 *   own internal calls, such as fopen's open), and each hooked call costs the backend a
 *   trap into the kernel and back. A failed call returns -1 with the error in the
 *   thread's errno: libc_ret() reads it through the thread pointer where the kernel's
 *   BTF and the process's GOT tell where it is, else `ret` stays -1.
 *
 * Filtered first by the zone_pids map so a non-zone process pays one hash lookup. Path
 * operations stash their arguments at entry and emit one record at exit with the result.
 * Reads and writes are counted per (pid, fd) in the kernel; only the first of an open
 * period and the close (with totals) cross into user space.
 */
#include <uapi/linux/fcntl.h>
#include <uapi/linux/openat2.h>
#include <uapi/linux/ptrace.h>
#include "zonewatch.h"

/* pwritev2/preadv2 tracepoint formats name this kernel-internal type. */
typedef int rwf_t;

#ifndef ZW_MAX_ZONE_PIDS
#define ZW_MAX_ZONE_PIDS 16384
#endif
#ifndef ZW_MAX_FDS
#define ZW_MAX_FDS 65536
#endif
#ifndef ZW_RINGBUF_PAGES
#define ZW_RINGBUF_PAGES 256
#endif

BPF_HASH(zone_pids, u32, u32, ZW_MAX_ZONE_PIDS);            /* tgid -> zone key */
BPF_HASH(pending, u32, struct zw_file_event, 4096);         /* tid -> stashed record */
BPF_HASH(pending_io, u32, struct zw_fd_key, 4096);          /* tid -> fd being read/written */
BPF_TABLE("lru_hash", struct zw_fd_key, struct zw_fd_state, fds, ZW_MAX_FDS);
BPF_PERCPU_ARRAY(scratch, struct zw_file_event, 1);
BPF_PERCPU_ARRAY(lost, u64, ZW_LOST_NSOURCES);
BPF_PERCPU_ARRAY(sent, u64, 1);  /* records sent from this CPU, for batched wake-ups */
BPF_RINGBUF_OUTPUT(events, ZW_RINGBUF_PAGES);

/* A reader that keeps up is woken by ringbuf_output(.., 0) for nearly every record, and
 * the traced backend thread pays for each wake-up (irq_work: a self-IPI, a VM exit on a
 * virtualized host). Wake it once per ZW_RB_WAKE_EVERY records from a CPU instead; the
 * agent also drains every ring each poll interval, so a lone record waits at most that. */
#ifndef ZW_RB_WAKE_EVERY
#define ZW_RB_WAKE_EVERY 64
#endif

static __always_inline void count_lost(int source)
{
	u64 *n = lost.lookup(&source);
	if (n)
		(*n)++;
}

static __always_inline void send(struct zw_file_event *e)
{
	int zero = 0;
	u64 *n = sent.lookup(&zero);
	u64 flags = BPF_RB_FORCE_WAKEUP;
	if (n && ++*n % ZW_RB_WAKE_EVERY)
		flags = BPF_RB_NO_WAKEUP;
	if (events.ringbuf_output(e, sizeof(*e), flags) != 0)
		count_lost(ZW_LOST_RINGBUF);
}

static __always_inline u32 *zone_of_current(void)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	return zone_pids.lookup(&tgid);
}

static __always_inline struct zw_file_event *fresh_record(u32 zone_key, u32 op)
{
	int zero = 0;
	struct zw_file_event *e = scratch.lookup(&zero);
	if (!e)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	__builtin_memset(e, 0, sizeof(*e));
	e->hdr.type = ZW_REC_FILE;
	e->hdr.size = sizeof(*e);
	e->hdr.zone_key = zone_key;
	e->hdr.ts_ns = bpf_ktime_get_ns();
	e->hdr.pid = id >> 32;
	e->hdr.tid = (u32)id;
	bpf_get_current_comm(&e->hdr.comm, sizeof(e->hdr.comm));
	e->op = op;
	return e;
}

/* Entry of a path operation: stash the arguments until the syscall returns. */
static __always_inline int path_enter(u32 op, int dirfd, const char *path, int dirfd2,
				      const char *path2, u64 flags, u32 mode)
{
	u32 *zone = zone_of_current();
	if (!zone)
		return 0;
	struct zw_file_event *e = fresh_record(*zone, op);
	if (!e)
		return 0;
	e->dirfd = dirfd;
	e->dirfd2 = dirfd2;
	e->flags = flags;
	e->mode = mode;
	if (path)
		bpf_probe_read_user_str(e->path, sizeof(e->path), path);
	if (path2)
		bpf_probe_read_user_str(e->path2, sizeof(e->path2), path2);
	u32 tid = e->hdr.tid;
	if (pending.update(&tid, e) != 0)
		count_lost(ZW_LOST_PENDING);
	return 0;
}

/* Exit of a path operation: emit the stashed record with the result. */
static __always_inline int path_exit(long ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct zw_file_event *e = pending.lookup(&tid);
	if (!e)
		return 0;
	e->ret = ret;
	if (e->op == ZW_FILE_OPEN && ret >= 0) {
		/* Track the new fd so its I/O is counted here, not sent per call. */
		struct zw_fd_key key = {.pid = e->hdr.pid, .fd = (s32)ret};
		struct zw_fd_state state = {.zone_key = e->hdr.zone_key};
		fds.update(&key, &state);
	}
	send(e);
	pending.delete(&tid);
	return 0;
}

/* An fd-based metadata operation (fchmod, fchown, ftruncate, fsetxattr). */
static __always_inline int fd_op_enter(u32 op, int fd, const char *name, u32 mode)
{
	return path_enter(op, fd, 0, -1, name, 0, mode);
}

/* Entry of read/write: remember the fd if the kernel tracks it. */
static __always_inline int io_enter(int fd)
{
	u32 *zone = zone_of_current();
	if (!zone)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	struct zw_fd_key key = {.pid = id >> 32, .fd = fd};
	if (!fds.lookup(&key))
		return 0;
	u32 tid = (u32)id;
	pending_io.update(&tid, &key);
	return 0;
}

/* Exit of read/write: add to the fd's totals; the first of an open period is a record. */
static __always_inline int io_exit(long ret, int is_write)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct zw_fd_key *key = pending_io.lookup(&tid);
	if (!key)
		return 0;
	struct zw_fd_key k = *key;
	pending_io.delete(&tid);
	if (ret <= 0)
		return 0;
	struct zw_fd_state *st = fds.lookup(&k);
	if (!st)
		return 0;
	u64 before = is_write ? st->bytes_written : st->bytes_read;
	if (is_write)
		__sync_fetch_and_add(&st->bytes_written, ret);
	else
		__sync_fetch_and_add(&st->bytes_read, ret);
	if (before != 0)
		return 0;
	struct zw_file_event *e = fresh_record(st->zone_key, is_write ? ZW_FILE_WRITE : ZW_FILE_READ);
	if (!e)
		return 0;
	e->dirfd = k.fd;
	e->ret = ret;
	send(e);
	return 0;
}

/* close(): a tracked fd that saw I/O reports its totals; every tracked fd is forgotten. */
static __always_inline int close_enter(int fd)
{
	u32 *zone = zone_of_current();
	if (!zone)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	struct zw_fd_key key = {.pid = id >> 32, .fd = fd};
	struct zw_fd_state *st = fds.lookup(&key);
	if (!st)
		return 0;
	if (st->bytes_read || st->bytes_written) {
		struct zw_file_event *e = fresh_record(st->zone_key, ZW_FILE_CLOSE);
		if (e) {
			e->dirfd = fd;
			e->bytes_read = st->bytes_read;
			e->bytes_written = st->bytes_written;
			send(e);
		}
	}
	fds.delete(&key);
	return 0;
}

/* A reused pid must never inherit a dead zone: forget the process the moment it exits. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	if ((u32)id == tgid)
		zone_pids.delete(&tgid);
	return 0;
}

#ifdef ZW_FILE_UPROBES
/* ==== uprobes on libc (zonewatch/probes/uprobes.py LIBC_HOOKS names the functions) ====
 *
 * Arguments are read from the registers of the x86-64 SysV call (PT_REGS_PARMn). A
 * uretprobe sees the wrapper's return register: int returns are cast from 32 bits.
 */
#define ARG1 ((long)PT_REGS_PARM1(ctx))
#define ARG2 ((long)PT_REGS_PARM2(ctx))
#define ARG3 ((long)PT_REGS_PARM3(ctx))
#define ARG4 ((long)PT_REGS_PARM4(ctx))
#define ARG5 ((long)PT_REGS_PARM5(ctx))
#define PTR(x) ((const char *)(x))

/* tgid -> errno's offset from the thread pointer (zonewatch/probes/tls.py reads it from the
 * process's GOT); with the FS base's offset in task_struct (-DZW_TASK_FSBASE, from the
 * kernel's BTF) a failed call reports -errno as the tracepoints do. Without them: -1. */
BPF_HASH(errno_tls, u32, s64, ZW_MAX_ZONE_PIDS);

/* A libc call's int result as the syscall gave it: -1 becomes -errno where errno is known. */
static __always_inline long libc_ret(long ret)
{
#ifdef ZW_TASK_FSBASE
	if (ret != -1)
		return ret;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	s64 *tpoff = errno_tls.lookup(&tgid);
	if (!tpoff)
		return ret;
	u64 task = bpf_get_current_task();
	u64 fsbase = 0;
	if (bpf_probe_read_kernel(&fsbase, sizeof(fsbase), (void *)(task + ZW_TASK_FSBASE)) != 0 ||
	    fsbase == 0)
		return ret;
	int err = 0;
	if (bpf_probe_read_user(&err, sizeof(err), (void *)(fsbase + *tpoff)) != 0 || err <= 0)
		return ret;
	return -err;
#else
	return ret;
#endif
}

/* open's mode is a variadic argument that libc passes to the kernel only when the flags
 * need one (glibc's __OPEN_NEEDS_MODE); otherwise the kernel, and the tracepoint, see 0. */
static __always_inline u32 open_mode(long flags, long mode)
{
	if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE)
		return (u32)mode;
	return 0;
}

/* ---- opens ---- */
int zw_openat(struct pt_regs *ctx)  /* openat(dirfd, path, flags, mode) */
{
	return path_enter(ZW_FILE_OPEN, ARG1, PTR(ARG2), -1, 0, (int)ARG3,
			  open_mode(ARG3, ARG4));
}

int zw_open(struct pt_regs *ctx)  /* open(path, flags, mode) */
{
	return path_enter(ZW_FILE_OPEN, AT_FDCWD, PTR(ARG1), -1, 0, (int)ARG2,
			  open_mode(ARG2, ARG3));
}

int zw_creat(struct pt_regs *ctx)  /* creat(path, mode) */
{
	return path_enter(ZW_FILE_OPEN, AT_FDCWD, PTR(ARG1), -1, 0,
			  O_CREAT | O_WRONLY | O_TRUNC, (u32)ARG2);
}

/* ---- namespace changes ---- */
int zw_mkdirat(struct pt_regs *ctx)  /* mkdirat(dirfd, path, mode) */
{
	return path_enter(ZW_FILE_MKDIR, ARG1, PTR(ARG2), -1, 0, 0, (u32)ARG3);
}

int zw_mkdir(struct pt_regs *ctx)  /* mkdir(path, mode) */
{
	return path_enter(ZW_FILE_MKDIR, AT_FDCWD, PTR(ARG1), -1, 0, 0, (u32)ARG2);
}

int zw_mknodat(struct pt_regs *ctx)  /* mknodat(dirfd, path, mode, dev) */
{
	return path_enter(ZW_FILE_MKNOD, ARG1, PTR(ARG2), -1, 0, (u32)ARG4, (u32)ARG3);
}

int zw_unlinkat(struct pt_regs *ctx)  /* unlinkat(dirfd, path, flags) */
{
	return path_enter(ZW_FILE_UNLINK, ARG1, PTR(ARG2), -1, 0, (int)ARG3, 0);
}

int zw_unlink(struct pt_regs *ctx)  /* unlink(path) */
{
	return path_enter(ZW_FILE_UNLINK, AT_FDCWD, PTR(ARG1), -1, 0, 0, 0);
}

int zw_rmdir(struct pt_regs *ctx)  /* rmdir(path) */
{
	return path_enter(ZW_FILE_RMDIR, AT_FDCWD, PTR(ARG1), -1, 0, 0, 0);
}

int zw_renameat2(struct pt_regs *ctx)  /* renameat2(olddfd, old, newdfd, new, flags) */
{
	return path_enter(ZW_FILE_RENAME, ARG1, PTR(ARG2), ARG3, PTR(ARG4), (u32)ARG5, 0);
}

int zw_renameat(struct pt_regs *ctx)  /* renameat(olddfd, old, newdfd, new) */
{
	return path_enter(ZW_FILE_RENAME, ARG1, PTR(ARG2), ARG3, PTR(ARG4), 0, 0);
}

int zw_rename(struct pt_regs *ctx)  /* rename(old, new) */
{
	return path_enter(ZW_FILE_RENAME, AT_FDCWD, PTR(ARG1), AT_FDCWD, PTR(ARG2), 0, 0);
}

int zw_linkat(struct pt_regs *ctx)  /* linkat(olddfd, old, newdfd, new, flags) */
{
	return path_enter(ZW_FILE_LINK, ARG1, PTR(ARG2), ARG3, PTR(ARG4), (int)ARG5, 0);
}

int zw_symlinkat(struct pt_regs *ctx)  /* symlinkat(target, newdfd, linkpath) */
{
	/* The target is text, not a path resolved against a dirfd. */
	return path_enter(ZW_FILE_SYMLINK, -1, PTR(ARG1), ARG2, PTR(ARG3), 0, 0);
}

/* ---- attributes ---- */
int zw_fchmodat(struct pt_regs *ctx)  /* fchmodat(dirfd, path, mode, flags) */
{
	return path_enter(ZW_FILE_CHMOD, ARG1, PTR(ARG2), -1, 0, (int)ARG4, (u32)ARG3);
}

int zw_fchmod(struct pt_regs *ctx)  /* fchmod(fd, mode) */
{
	return fd_op_enter(ZW_FILE_CHMOD, ARG1, 0, (u32)ARG2);
}

int zw_fchownat(struct pt_regs *ctx)  /* fchownat(dirfd, path, user, group, flags) */
{
	return path_enter(ZW_FILE_CHOWN, ARG1, PTR(ARG2), -1, 0,
			  ((u64)(u32)ARG3 << 32) | (u32)ARG4, 0);
}

int zw_fchown(struct pt_regs *ctx)  /* fchown(fd, user, group) */
{
	return path_enter(ZW_FILE_CHOWN, ARG1, 0, -1, 0, ((u64)(u32)ARG2 << 32) | (u32)ARG3, 0);
}

int zw_truncate(struct pt_regs *ctx)  /* truncate(path, length) */
{
	return path_enter(ZW_FILE_TRUNCATE, AT_FDCWD, PTR(ARG1), -1, 0, ARG2, 0);
}

int zw_ftruncate(struct pt_regs *ctx)  /* ftruncate(fd, length) */
{
	return path_enter(ZW_FILE_TRUNCATE, ARG1, 0, -1, 0, ARG2, 0);
}

/* QEMU's 9p "mapped" security models keep guest mode and owner in user.virtfs.* xattrs. */
int zw_setxattr(struct pt_regs *ctx)  /* (l)setxattr(path, name, value, size, flags) */
{
	return path_enter(ZW_FILE_SETXATTR, AT_FDCWD, PTR(ARG1), -1, PTR(ARG2), (int)ARG5, 0);
}

int zw_fsetxattr(struct pt_regs *ctx)  /* fsetxattr(fd, name, value, size, flags) */
{
	return path_enter(ZW_FILE_SETXATTR, ARG1, 0, -1, PTR(ARG2), (int)ARG5, 0);
}

/* Return of every path operation above: each returns int. */
int zw_path_ret(struct pt_regs *ctx)
{
	return path_exit(libc_ret((int)PT_REGS_RC(ctx)));
}

/* ---- data: read/write/pread64/pwrite64/readv/writev/preadv/pwritev(2) take the fd first
 * and return ssize_t. ---- */
int zw_io(struct pt_regs *ctx)
{
	return io_enter(ARG1);
}

int zw_read_ret(struct pt_regs *ctx)
{
	return io_exit((long)PT_REGS_RC(ctx), 0);
}

int zw_write_ret(struct pt_regs *ctx)
{
	return io_exit((long)PT_REGS_RC(ctx), 1);
}

int zw_close(struct pt_regs *ctx)  /* close(fd) */
{
	return close_enter(ARG1);
}

#else /* syscall tracepoints */

#define EXIT_PROBE(name) \
	TRACEPOINT_PROBE(syscalls, sys_exit_##name) { return path_exit(args->ret); }

/* ---- opens ---- */
#ifdef ZW_TP_openat
TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
	return path_enter(ZW_FILE_OPEN, args->dfd, args->filename, -1, 0, args->flags, args->mode);
}
EXIT_PROBE(openat)
#endif
#ifdef ZW_TP_openat2
TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
	struct open_how how = {};
	bpf_probe_read_user(&how, sizeof(how), args->how);
	return path_enter(ZW_FILE_OPEN, args->dfd, args->filename, -1, 0, how.flags, how.mode);
}
EXIT_PROBE(openat2)
#endif
#ifdef ZW_TP_open
TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
	return path_enter(ZW_FILE_OPEN, AT_FDCWD, args->filename, -1, 0, args->flags, args->mode);
}
EXIT_PROBE(open)
#endif
#ifdef ZW_TP_creat
TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
	return path_enter(ZW_FILE_OPEN, AT_FDCWD, args->pathname, -1, 0,
			  O_CREAT | O_WRONLY | O_TRUNC, args->mode);
}
EXIT_PROBE(creat)
#endif

/* ---- namespace changes ---- */
#ifdef ZW_TP_mkdirat
TRACEPOINT_PROBE(syscalls, sys_enter_mkdirat)
{
	return path_enter(ZW_FILE_MKDIR, args->dfd, args->pathname, -1, 0, 0, args->mode);
}
EXIT_PROBE(mkdirat)
#endif
#ifdef ZW_TP_mkdir
TRACEPOINT_PROBE(syscalls, sys_enter_mkdir)
{
	return path_enter(ZW_FILE_MKDIR, AT_FDCWD, args->pathname, -1, 0, 0, args->mode);
}
EXIT_PROBE(mkdir)
#endif
#ifdef ZW_TP_mknodat
TRACEPOINT_PROBE(syscalls, sys_enter_mknodat)
{
	return path_enter(ZW_FILE_MKNOD, args->dfd, args->filename, -1, 0, args->dev, args->mode);
}
EXIT_PROBE(mknodat)
#endif
#ifdef ZW_TP_unlinkat
TRACEPOINT_PROBE(syscalls, sys_enter_unlinkat)
{
	return path_enter(ZW_FILE_UNLINK, args->dfd, args->pathname, -1, 0, args->flag, 0);
}
EXIT_PROBE(unlinkat)
#endif
#ifdef ZW_TP_unlink
TRACEPOINT_PROBE(syscalls, sys_enter_unlink)
{
	return path_enter(ZW_FILE_UNLINK, AT_FDCWD, args->pathname, -1, 0, 0, 0);
}
EXIT_PROBE(unlink)
#endif
#ifdef ZW_TP_rmdir
TRACEPOINT_PROBE(syscalls, sys_enter_rmdir)
{
	return path_enter(ZW_FILE_RMDIR, AT_FDCWD, args->pathname, -1, 0, 0, 0);
}
EXIT_PROBE(rmdir)
#endif
#ifdef ZW_TP_renameat2
TRACEPOINT_PROBE(syscalls, sys_enter_renameat2)
{
	return path_enter(ZW_FILE_RENAME, args->olddfd, args->oldname, args->newdfd,
			  args->newname, args->flags, 0);
}
EXIT_PROBE(renameat2)
#endif
#ifdef ZW_TP_renameat
TRACEPOINT_PROBE(syscalls, sys_enter_renameat)
{
	return path_enter(ZW_FILE_RENAME, args->olddfd, args->oldname, args->newdfd,
			  args->newname, 0, 0);
}
EXIT_PROBE(renameat)
#endif
#ifdef ZW_TP_rename
TRACEPOINT_PROBE(syscalls, sys_enter_rename)
{
	return path_enter(ZW_FILE_RENAME, AT_FDCWD, args->oldname, AT_FDCWD, args->newname, 0, 0);
}
EXIT_PROBE(rename)
#endif
#ifdef ZW_TP_linkat
TRACEPOINT_PROBE(syscalls, sys_enter_linkat)
{
	return path_enter(ZW_FILE_LINK, args->olddfd, args->oldname, args->newdfd,
			  args->newname, args->flags, 0);
}
EXIT_PROBE(linkat)
#endif
#ifdef ZW_TP_symlinkat
TRACEPOINT_PROBE(syscalls, sys_enter_symlinkat)
{
	/* The target is text, not a path resolved against a dirfd. */
	return path_enter(ZW_FILE_SYMLINK, -1, args->oldname, args->newdfd, args->newname, 0, 0);
}
EXIT_PROBE(symlinkat)
#endif

/* ---- attributes ---- */
#ifdef ZW_TP_fchmodat
TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat)
{
	return path_enter(ZW_FILE_CHMOD, args->dfd, args->filename, -1, 0, 0, args->mode);
}
EXIT_PROBE(fchmodat)
#endif
#ifdef ZW_TP_fchmodat2
TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat2)
{
	return path_enter(ZW_FILE_CHMOD, args->dfd, args->filename, -1, 0, args->flags,
			  args->mode);
}
EXIT_PROBE(fchmodat2)
#endif
#ifdef ZW_TP_fchmod
TRACEPOINT_PROBE(syscalls, sys_enter_fchmod)
{
	return fd_op_enter(ZW_FILE_CHMOD, args->fd, 0, args->mode);
}
EXIT_PROBE(fchmod)
#endif
#ifdef ZW_TP_fchownat
TRACEPOINT_PROBE(syscalls, sys_enter_fchownat)
{
	return path_enter(ZW_FILE_CHOWN, args->dfd, args->filename, -1, 0,
			  ((u64)args->user << 32) | (u32)args->group, 0);
}
EXIT_PROBE(fchownat)
#endif
#ifdef ZW_TP_fchown
TRACEPOINT_PROBE(syscalls, sys_enter_fchown)
{
	return path_enter(ZW_FILE_CHOWN, args->fd, 0, -1, 0,
			  ((u64)args->user << 32) | (u32)args->group, 0);
}
EXIT_PROBE(fchown)
#endif
#ifdef ZW_TP_truncate
TRACEPOINT_PROBE(syscalls, sys_enter_truncate)
{
	return path_enter(ZW_FILE_TRUNCATE, AT_FDCWD, args->path, -1, 0, args->length, 0);
}
EXIT_PROBE(truncate)
#endif
#ifdef ZW_TP_ftruncate
TRACEPOINT_PROBE(syscalls, sys_enter_ftruncate)
{
	return path_enter(ZW_FILE_TRUNCATE, args->fd, 0, -1, 0, args->length, 0);
}
EXIT_PROBE(ftruncate)
#endif
/* QEMU's 9p "mapped" security models keep guest mode and owner in user.virtfs.* xattrs. */
#ifdef ZW_TP_lsetxattr
TRACEPOINT_PROBE(syscalls, sys_enter_lsetxattr)
{
	return path_enter(ZW_FILE_SETXATTR, AT_FDCWD, args->pathname, -1, args->name,
			  args->flags, 0);
}
EXIT_PROBE(lsetxattr)
#endif
#ifdef ZW_TP_setxattr
TRACEPOINT_PROBE(syscalls, sys_enter_setxattr)
{
	return path_enter(ZW_FILE_SETXATTR, AT_FDCWD, args->pathname, -1, args->name,
			  args->flags, 0);
}
EXIT_PROBE(setxattr)
#endif
#ifdef ZW_TP_fsetxattr
TRACEPOINT_PROBE(syscalls, sys_enter_fsetxattr)
{
	return path_enter(ZW_FILE_SETXATTR, args->fd, 0, -1, args->name, args->flags, 0);
}
EXIT_PROBE(fsetxattr)
#endif

/* ---- data ---- */
#define IO_PROBES(name, is_write) \
	TRACEPOINT_PROBE(syscalls, sys_enter_##name) { return io_enter(args->fd); } \
	TRACEPOINT_PROBE(syscalls, sys_exit_##name) { return io_exit(args->ret, is_write); }

#ifdef ZW_TP_write
IO_PROBES(write, 1)
#endif
#ifdef ZW_TP_pwrite64
IO_PROBES(pwrite64, 1)
#endif
#ifdef ZW_TP_writev
IO_PROBES(writev, 1)
#endif
#ifdef ZW_TP_pwritev
IO_PROBES(pwritev, 1)
#endif
#ifdef ZW_TP_pwritev2
IO_PROBES(pwritev2, 1)
#endif
#ifdef ZW_TP_read
IO_PROBES(read, 0)
#endif
#ifdef ZW_TP_pread64
IO_PROBES(pread64, 0)
#endif
#ifdef ZW_TP_readv
IO_PROBES(readv, 0)
#endif
#ifdef ZW_TP_preadv
IO_PROBES(preadv, 0)
#endif
#ifdef ZW_TP_preadv2
IO_PROBES(preadv2, 0)
#endif

#ifdef ZW_TP_close
TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
	return close_enter(args->fd);
}
#endif

#endif /* ZW_FILE_UPROBES */
