/* A zone VMM's 9p backend for the benchmarks (bench_file, bench_file_hooks, bench_live):
 * it holds a directory fd on its "share" (64 files of 4 KiB), as QEMU holds its fids, and
 * on each stdin command
 *     run SECONDS RATE WRITE_EVERY
 * does file ops for SECONDS, RATE ops/s (0: flat out), and prints "OPS WRITES NS". One op
 * is what a guest's read of a small file costs the backend: openat(dirfd, name, O_RDWR) +
 * pread 4 KiB + close, and every WRITE_EVERY-th op (0: never) also a pwrite of 64 bytes. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NFILES 64
#define FILE_BYTES 4096
#define BATCH 16  /* ops per clock read */

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static char buf[FILE_BYTES];
static char names[NFILES][16];

static int one_op(int dfd, long op, long write_every, long *writes)
{
	int fd = openat(dfd, names[op % NFILES], O_RDWR);
	if (fd < 0) { perror("openat"); return -1; }
	if (pread(fd, buf, FILE_BYTES, 0) != FILE_BYTES) { perror("pread"); return -1; }
	if (write_every && op % write_every == 0) {
		if (pwrite(fd, buf, 64, 0) != 64) { perror("pwrite"); return -1; }
		(*writes)++;
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	char line[96];
	if (argc != 2) { fprintf(stderr, "usage: %s SHARE\n", argv[0]); return 2; }
	int dfd = open(argv[1], O_DIRECTORY | O_RDONLY);  /* the share's root fid */
	if (dfd < 0) { perror("open share"); return 1; }
	memset(buf, 'z', sizeof buf);
	for (int i = 0; i < NFILES; i++) {
		snprintf(names[i], sizeof names[i], "f%03d", i);
		int fd = openat(dfd, names[i], O_CREAT | O_WRONLY | O_TRUNC, 0644);
		if (fd < 0 || write(fd, buf, FILE_BYTES) != FILE_BYTES) { perror("create"); return 1; }
		close(fd);
	}
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		double seconds, rate;
		long write_every;
		if (sscanf(line, "run %lf %lf %ld", &seconds, &rate, &write_every) != 3) return 2;
		long ops = 0, writes = 0;
		double start = now(), end = start + seconds, t;
		while ((t = now()) < end) {
			if (rate > 0) {
				double due = start + ops / rate;  /* when op number `ops` is due */
				if (t < due) {
					double wait = due - t;
					struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
					nanosleep(&ts, NULL);
					continue;
				}
			}
			for (int k = 0; k < BATCH; k++, ops++)
				if (one_op(dfd, ops, write_every, &writes) < 0)
					return 1;
		}
		printf("%ld %ld %.0f\n", ops, writes, (now() - start) * 1e9);
		fflush(stdout);
	}
	return 0;
}
