/*
 * loadgen: a small TCP echo load generator for netlib's benchmarks (C99, Linux epoll).
 *
 *   loadgen pingpong 127.0.0.1:PORT [-c CONNS] [-s SIZE] [options]
 *   loadgen connect  127.0.0.1:PORT [-c PARALLEL] [-s SIZE] [options]
 *
 *   -c N   pingpong: connections (100); connect: parallel workers (8)
 *   -s B   message size in bytes (64): B - 1 times 'x', then '\n' (line servers work too)
 *   -w S   warm-up seconds before the measured window (1.0)
 *   -d S   measured window, seconds (2.0)
 *   -t S   timeout, seconds (5.0): for connecting, for one round trip, for the final drain
 *   -C N   pin this process to CPU N (sched_setaffinity)
 *   -S     print "start" and "stop CPU_S" lines at the window's edges (CPU_S: this
 *          process's CPU time in the window), for a harness that samples the server there
 *
 * pingpong: CONNS connections (TCP_NODELAY), each with exactly one message in flight; the
 *   next message goes out when the whole echo of the previous one is back, and every echo
 *   is compared byte for byte. A connection that fails (error, reset, close, wrong echo,
 *   no echo within the timeout) is counted in "errors" and closed, not reopened.
 * connect: PARALLEL workers, each in a loop: non-blocking connect, send one message, wait
 *   for its whole echo, close. A failed attempt is counted in "failures"; the worker tries
 *   again 10 ms later.
 *
 * Output: one JSON line on stdout: what completed in the measured window (messages or
 * connections), its elapsed seconds and rate, the latency p50/p99 in microseconds (per
 * round trip; per connection in connect mode: connect to echo complete), errors. After the
 * window, work in flight is allowed to finish (not counted) for at most the timeout. Exit
 * status 0 when the run completed (errors are in the JSON), 2 on bad usage or setup error.
 * The run can never hang: every wait is bounded, and SIGALRM ends the process in the end.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CLOSED, CONNECTING, ACTIVE, FINISHED };     /* connection states */
enum { CONNECT, WARMUP, MEASURE, DRAIN };          /* phases of the run */

struct conn {
    int fd, state, want_out;  /* want_out: EPOLLOUT is in the epoll set (a partial write) */
    size_t wpos, rpos;     /* bytes of the current message sent, and echoed back */
    uint64_t started;      /* ns: the current message was sent (connect mode: connect began) */
    uint64_t retry_at;     /* connect mode: when a failed worker tries again */
};

static int pingpong, phase, epfd, nconns, markers;
static size_t size = 64;
static char *msg, rbuf[65536];
static struct conn *conns;
static struct sockaddr_in addr;
static uint64_t timeout_ns, completed, errors, active;
static char first_error[128];

/* ---- clock and latency histogram -------------------------------------------------------- */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void) {  /* this process's user + system time */
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec)
           + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* Log-linear buckets in ns: values below 128 exactly, then 64 buckets per power of two
 * (at most 1.6% wide), so any 64-bit value fits in 64 * 64 buckets. */
#define SUB 64
static uint64_t hist[64 * SUB], hist_count;

static void hist_add(uint64_t ns) {
    int shift = 0;
    while ((ns >> shift) >= 2 * SUB) shift++;
    hist[shift * SUB + (int)(ns >> shift)]++;
    hist_count++;
}

static double hist_quantile_us(double q) {  /* the middle of the bucket holding rank q */
    uint64_t rank = (uint64_t)(q * (double)hist_count), seen = 0;  /* ceil(q * count) */
    if (hist_count == 0) return 0.0;
    if ((double)rank < q * (double)hist_count || rank < 1) rank++;
    for (int i = 0; i < 64 * SUB; i++) {
        seen += hist[i];
        if (seen >= rank) {
            if (i < 2 * SUB) return i / 1000.0;
            int shift = i / SUB - 1;
            uint64_t low = (uint64_t)(i - shift * SUB) << shift;
            return ((double)low + (double)(1ull << shift) / 2) / 1000.0;
        }
    }
    return 0.0;
}

/* ---- connections ------------------------------------------------------------------------ */

static void fail(struct conn *c, int err, const char *what) {
    if (c->state == CLOSED || c->state == FINISHED) return;  /* already failed or done */
    if (!first_error[0])
        snprintf(first_error, sizeof first_error, "%s: %s", what, err ? strerror(err) : "");
    errors++;
    if (c->fd >= 0) close(c->fd);  /* also leaves the epoll set */
    c->fd = -1;
    c->state = CLOSED;
    active--;
    c->retry_at = now_ns() + 10000000u;  /* connect mode: back off 10 ms */
}

static void watch(struct conn *c, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data = {.ptr = c}};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) fail(c, errno, "epoll_ctl");
}

/* Send what is left of the current message; wait for EPOLLOUT only while the socket is full. */
static void send_rest(struct conn *c) {
    while (c->wpos < size) {
        ssize_t n = send(c->fd, msg + c->wpos, size - c->wpos, MSG_NOSIGNAL);
        if (n >= 0) { c->wpos += (size_t)n; continue; }
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) { fail(c, errno, "send"); return; }
        if (!c->want_out) { c->want_out = 1; watch(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT); }
        return;  /* partial write: the rest goes out on EPOLLOUT */
    }
    if (c->want_out) { c->want_out = 0; watch(c, EPOLL_CTL_MOD, EPOLLIN); }
}

static void send_message(struct conn *c) {
    c->wpos = c->rpos = 0;
    if (pingpong) c->started = now_ns();
    send_rest(c);
}

/* Open a non-blocking connection; it is ACTIVE once connect() has completed. */
static void open_conn(struct conn *c) {
    int one = 1;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->state = CONNECTING;
    c->want_out = 0;
    c->started = now_ns();
    active++;
    if (c->fd < 0) { fail(c, errno, "socket"); return; }
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        fail(c, errno, "connect");
        return;
    }
    watch(c, EPOLL_CTL_ADD, EPOLLOUT);  /* writable: the connect completed (or failed) */
}

/* A whole echo came back: count it if inside the window, then go on or stop. */
static void echo_done(struct conn *c) {
    uint64_t now = now_ns();
    if (phase == MEASURE) {
        completed++;
        hist_add(now - c->started);
    }
    if (!pingpong) {  /* connect mode: close, and open the next connection */
        close(c->fd);
        c->fd = -1;
        active--;
        c->state = CLOSED;
        c->retry_at = 0;
    } else if (phase == DRAIN) {
        c->state = FINISHED;
        active--;
    } else {
        send_message(c);
    }
}

static void on_event(struct conn *c, uint32_t events) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err) { fail(c, err, "connect"); return; }
        c->state = ACTIVE;
        watch(c, EPOLL_CTL_MOD, EPOLLIN);
        if (c->state == ACTIVE) send_message(c);
        return;
    }
    if (c->state != ACTIVE) return;
    if ((events & EPOLLOUT) && c->wpos < size) {
        send_rest(c);
        if (c->state != ACTIVE) return;
    }
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP))) return;
    while (c->rpos < size) {  /* read until the echo is whole or the socket is empty */
        ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno != EINTR) { fail(c, errno, "recv"); return; }
            continue;
        }
        if (n == 0) { fail(c, 0, "server closed the connection"); return; }
        if (c->rpos + (size_t)n > c->wpos || memcmp(rbuf, msg + c->rpos, (size_t)n) != 0) {
            fail(c, 0, "echo differs from the message sent");
            return;
        }
        c->rpos += (size_t)n;
    }
    echo_done(c);
}

/* ---- main: options, phases, output -------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr, "usage: loadgen pingpong|connect 127.0.0.1:PORT [-c N] [-s BYTES]"
                    " [-w WARMUP_S] [-d DURATION_S] [-t TIMEOUT_S] [-C CPU] [-S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    double warmup = 1.0, duration = 2.0, timeout = 5.0, window_cpu = 0.0, elapsed = 0.0;
    int cpu = -1, opt, port;
    char *colon;
    if (argc < 3) usage();
    pingpong = strcmp(argv[1], "pingpong") == 0;
    if (!pingpong && strcmp(argv[1], "connect") != 0) usage();
    nconns = pingpong ? 100 : 8;
    colon = strrchr(argv[2], ':');
    if (!colon || strncmp(argv[2], "127.0.0.1:", 10) != 0) usage();  /* loopback only */
    port = atoi(colon + 1);
    while ((opt = getopt(argc - 2, argv + 2, "c:s:w:d:t:C:S")) != -1) {
        switch (opt) {
        case 'c': nconns = atoi(optarg); break;
        case 's': size = (size_t)atol(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 't': timeout = atof(optarg); break;
        case 'C': cpu = atoi(optarg); break;
        case 'S': markers = 1; break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || nconns < 1 || nconns > 50000 || size < 1
        || size > (16u << 20) || warmup < 0 || duration <= 0 || timeout <= 0)
        usage();

    struct rlimit files;  /* room for many connections: soft limit of open files = hard */
    if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
        files.rlim_cur = files.rlim_max;
        setrlimit(RLIMIT_NOFILE, &files);
    }
    /* never outlive the harness, and never run much longer than planned */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    alarm((unsigned)(warmup + duration + 2 * timeout) + 10);
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0) { perror("sched_setaffinity"); return 2; }
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    timeout_ns = (uint64_t)(timeout * 1e9);
    msg = malloc(size);
    conns = calloc((size_t)nconns, sizeof *conns);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!msg || !conns || epfd < 0) { perror("setup"); return 2; }
    memset(msg, 'x', size - 1);
    msg[size - 1] = '\n';

    /* pingpong opens every connection first (CONNECT phase); connect mode starts at once */
    uint64_t start = now_ns(), window_start = 0, next_phase;
    for (int i = 0; i < nconns; i++) open_conn(&conns[i]);
    phase = pingpong ? CONNECT : WARMUP;
    next_phase = pingpong ? start + timeout_ns : start + (uint64_t)(warmup * 1e9);
    struct epoll_event events[256];
    uint64_t last_scan = start;
    for (;;) {
        uint64_t now = now_ns();
        int connecting = 0;
        for (int i = 0; pingpong && phase == CONNECT && i < nconns; i++)
            connecting += conns[i].state == CONNECTING;
        if (phase == CONNECT && (connecting == 0 || now >= next_phase)) {
            phase = WARMUP;  /* connect timeouts are caught by the scan below */
            next_phase = now + (uint64_t)(warmup * 1e9);
        }
        if (phase == WARMUP && now >= next_phase) {
            phase = MEASURE;
            window_start = now;
            window_cpu = cpu_seconds();
            next_phase = now + (uint64_t)(duration * 1e9);
            if (markers) { printf("start\n"); fflush(stdout); }
        }
        /* the window ends on time, or early when every pingpong connection has failed */
        if ((phase == MEASURE && now >= next_phase) || (pingpong && active == 0 && phase < DRAIN)) {
            if (phase == MEASURE) {
                elapsed = (double)(now - window_start) / 1e9;
                window_cpu = cpu_seconds() - window_cpu;
            }
            if (markers && phase == MEASURE) { printf("stop %.6f\n", window_cpu); fflush(stdout); }
            if (markers && phase != MEASURE) { printf("stop 0\n"); fflush(stdout); }
            phase = DRAIN;
            next_phase = now + timeout_ns;
        }
        if (phase == DRAIN && (active == 0 || now >= next_phase)) break;

        /* fail what waited longer than the timeout (every 50 ms); restart idle workers */
        uint64_t wait_ns = next_phase > now ? next_phase - now : 0;
        if (wait_ns > 50000000u) wait_ns = 50000000u;
        if (now - last_scan >= 50000000u || !pingpong) {
            for (int i = 0; i < nconns; i++) {
                struct conn *c = &conns[i];
                if ((c->state == CONNECTING || c->state == ACTIVE) && now - c->started > timeout_ns)
                    fail(c, ETIMEDOUT, c->state == CONNECTING ? "connect" : "echo");
                if (pingpong || c->state != CLOSED || phase == DRAIN) continue;
                if (now >= c->retry_at)
                    open_conn(c);
                else if (c->retry_at - now < wait_ns)  /* wake up for the retry */
                    wait_ns = c->retry_at - now;
            }
            last_scan = now;
        }
        int n = epoll_wait(epfd, events, 256, (int)((wait_ns + 999999) / 1000000));
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 2; }
        for (int i = 0; i < n; i++) on_event(events[i].data.ptr, events[i].events);
    }

    double rate = elapsed > 0 ? (double)completed / elapsed : 0.0;
    printf("{\"mode\": \"%s\", \"%s\": %d, \"size\": %zu, \"warmup_s\": %g, \"duration_s\": %g,"
           " \"%s\": %llu, \"elapsed_s\": %.6f, \"%s\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f,"
           " \"%s\": %llu, \"first_error\": \"%s\", \"client_cpu_s\": %.6f, \"total_s\": %.3f}\n",
           argv[1], pingpong ? "connections" : "parallel", nconns, size, warmup, duration,
           pingpong ? "messages" : "connections", (unsigned long long)completed, elapsed,
           pingpong ? "msgs_per_s" : "conns_per_s", rate, hist_quantile_us(0.50),
           hist_quantile_us(0.99), pingpong ? "errors" : "failures",
           (unsigned long long)errors, first_error, window_cpu,
           (double)(now_ns() - start) / 1e9);
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd >= 0 && conns[i].state != CLOSED) close(conns[i].fd);
    return 0;
}
