/* udpgen: a paced UDP packet generator for weft's observability benchmark.
 *
 *   udpgen HOST PORT RATE SECONDS [FLOWS] [SIZE]
 *
 * Sends SIZE-byte (default 16) UDP datagrams to HOST:PORT at RATE packets per second (0: as
 * fast as one thread can) for SECONDS seconds, spread round-robin over FLOWS sockets (default 1),
 * i.e. FLOWS distinct source ports. Batches of up to 64 datagrams go out with one sendmmsg; the
 * pacing keeps the running total at RATE x elapsed (it never bursts more than one batch ahead).
 * Datagrams the kernel refused (ENOBUFS, ECONNREFUSED after an ICMP error) are counted, not
 * retried. Prints one JSON line: sent, refused, seconds, rate. Built by bench/common.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_FLOWS 1024

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: %s HOST PORT RATE SECONDS [FLOWS] [SIZE]\n", argv[0]);
		return 2;
	}
	const char *host = argv[1], *port = argv[2];
	double rate = atof(argv[3]), seconds = atof(argv[4]);
	int flows = argc > 5 ? atoi(argv[5]) : 1;
	int size = argc > 6 ? atoi(argv[6]) : 16;
	if (flows < 1 || flows > MAX_FLOWS || size < 1 || size > 1400 || seconds <= 0 || rate < 0) {
		fprintf(stderr, "udpgen: bad arguments\n");
		return 2;
	}
	struct addrinfo hints = {.ai_socktype = SOCK_DGRAM}, *ai;
	int err = getaddrinfo(host, port, &hints, &ai);
	if (err) {
		fprintf(stderr, "udpgen: %s: %s\n", host, gai_strerror(err));
		return 1;
	}
	int fds[MAX_FLOWS];
	for (int i = 0; i < flows; i++) {
		fds[i] = socket(ai->ai_family, SOCK_DGRAM, 0);
		if (fds[i] < 0 || connect(fds[i], ai->ai_addr, ai->ai_addrlen) < 0) {
			perror("udpgen: socket/connect");
			return 1;
		}
	}
	char payload[1400];
	memset(payload, 'w', sizeof(payload));
	struct iovec iov = {.iov_base = payload, .iov_len = (size_t)size};
	struct mmsghdr msgs[BATCH];
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	uint64_t sent = 0, refused = 0;
	int next_fd = 0;
	double start = now_s(), elapsed = 0;
	while ((elapsed = now_s() - start) < seconds) {
		int want = BATCH;
		if (rate > 0) {
			/* The first datagram is due at once, the next ones every 1/RATE seconds. */
			double due = rate * elapsed + 1 - (double)(sent + refused);
			if (due < 1) {
				/* Ahead of the schedule: wait until the next one is due. */
				double wait = (1 - due) / rate;
				struct timespec ts = {.tv_sec = (time_t)wait, .tv_nsec = (long)((wait - (time_t)wait) * 1e9)};
				nanosleep(&ts, NULL);
				continue;
			}
			want = due < BATCH ? (int)due : BATCH;
		}
		int n = sendmmsg(fds[next_fd], msgs, (unsigned)want, 0);
		next_fd = (next_fd + 1) % flows;
		if (n < 0) {
			if (errno == ENOBUFS || errno == ECONNREFUSED || errno == EAGAIN) {
				refused += (uint64_t)want;
				continue;
			}
			perror("udpgen: sendmmsg");
			return 1;
		}
		sent += (uint64_t)n;
	}
	printf("{\"sent\": %llu, \"refused\": %llu, \"seconds\": %.6f, \"rate\": %.1f}\n", (unsigned long long)sent,
	       (unsigned long long)refused, elapsed, (double)sent / elapsed);
	freeaddrinfo(ai);
	return 0;
}
