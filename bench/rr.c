/* rr: a TCP request/response benchmark (netperf TCP_RR style) for weft's benchmarks.
 *
 * One TCP connection, TCP_NODELAY, a SIZE-byte request answered by a SIZE-byte response, one
 * transaction in flight, for SECONDS seconds. Built by bench/common.py into build/bench/rr.
 *
 *   rr server PORT          listen on every address (dual-stack if IPv6 is on), print "ready PORT"
 *                           on stdout once listening, serve connections one after another, forever
 *   rr client HOST PORT SECONDS [SIZE]
 *                           print one JSON line: transactions, seconds, rate (per second),
 *                           mean/p50/p90/p99 round-trip latency in microseconds
 *
 * 1,000 warm-up transactions are made and not counted. Exit status 0 on success, 1 on error
 * (message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 1000
#define HIST_US 20000 /* 1 us buckets up to 20 ms, then one overflow bucket */
#define MAX_SIZE 65536

static void die(const char *what) {
    fprintf(stderr, "rr: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int read_full(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r == 0) return 0;
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        got += (size_t)r;
    }
    return 1;
}

static int write_full(int fd, const char *buf, size_t n) {
    size_t put = 0;
    while (put < n) {
        ssize_t w = write(fd, buf + put, n - put);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        put += (size_t)w;
    }
    return 0;
}

static void nodelay(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) die("TCP_NODELAY");
}

static int listen_any(int port) {
    int one = 1, zero = 0;
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    if (fd >= 0) {
        struct sockaddr_in6 a6;
        memset(&a6, 0, sizeof a6);
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)port);
        a6.sin6_addr = in6addr_any;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        if (bind(fd, (struct sockaddr *)&a6, sizeof a6) == 0) return fd;
        close(fd);
    }
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in a4;
    memset(&a4, 0, sizeof a4);
    a4.sin_family = AF_INET;
    a4.sin_port = htons((uint16_t)port);
    a4.sin_addr.s_addr = htonl(INADDR_ANY);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a4, sizeof a4) < 0) die("bind");
    return fd;
}

static int serve(int port) {
    static char buf[MAX_SIZE];
    int lfd = listen_any(port);
    if (listen(lfd, 16) < 0) die("listen");
    printf("ready %d\n", port);
    fflush(stdout);
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            die("accept");
        }
        nodelay(fd);
        /* Echo whatever arrives: the client's request size sets the response size. */
        for (;;) {
            ssize_t r = read(fd, buf, sizeof buf);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            if (write_full(fd, buf, (size_t)r) < 0) break;
        }
        close(fd);
    }
}

static int connect_to(const char *host, const char *port) {
    struct addrinfo hints, *res, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "rr: %s port %s: %s\n", host, port, gai_strerror(rc));
        exit(1);
    }
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) die("connect");
    return fd;
}

static double percentile(const uint64_t *hist, uint64_t total, double q) {
    uint64_t want = (uint64_t)(q * (double)total);
    uint64_t seen = 0;
    for (int i = 0; i <= HIST_US; i++) {
        seen += hist[i];
        if (seen > want) return (double)i + 0.5;
    }
    return (double)HIST_US;
}

static int client(const char *host, const char *port, double seconds, size_t size) {
    static char buf[MAX_SIZE];
    static uint64_t hist[HIST_US + 1];
    memset(buf, 'r', size);
    int fd = connect_to(host, port);
    nodelay(fd);
    for (int i = 0; i < WARMUP; i++) {
        if (write_full(fd, buf, size) < 0) die("write");
        if (read_full(fd, buf, size) != 1) die("read (warm-up)");
    }
    uint64_t n = 0;
    double sum_us = 0;
    double start = now_s(), end = start + seconds, t = start;
    while (t < end) {
        double t0 = t;
        if (write_full(fd, buf, size) < 0) die("write");
        int r = read_full(fd, buf, size);
        if (r != 1) {
            if (r == 0) errno = ECONNRESET;
            die("read");
        }
        t = now_s();
        double us = (t - t0) * 1e6;
        sum_us += us;
        long b = (long)us;
        hist[b < HIST_US ? b : HIST_US]++;
        n++;
    }
    double elapsed = t - start;
    close(fd);
    printf("{\"transactions\": %llu, \"seconds\": %.6f, \"rate\": %.1f, \"size\": %zu, \"mean_us\": %.2f, "
           "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f}\n",
           (unsigned long long)n, elapsed, (double)n / elapsed, size, n ? sum_us / (double)n : 0.0,
           percentile(hist, n, 0.50), percentile(hist, n, 0.90), percentile(hist, n, 0.99));
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && strcmp(argv[1], "server") == 0) return serve(atoi(argv[2]));
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "client") == 0) {
        double seconds = atof(argv[4]);
        long size = argc == 6 ? atol(argv[5]) : 1;
        if (seconds <= 0 || size < 1 || size > MAX_SIZE) {
            fprintf(stderr, "rr: SECONDS must be > 0 and SIZE 1..%d\n", MAX_SIZE);
            return 1;
        }
        return client(argv[2], argv[3], seconds, (size_t)size);
    }
    fprintf(stderr, "usage: rr server PORT | rr client HOST PORT SECONDS [SIZE]\n");
    return 1;
}
