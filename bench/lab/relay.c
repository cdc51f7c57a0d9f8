/*
 * dxa lab relay: the user-space link emulator of the WAN lab.
 *
 * It owns every TUN device of a lab run and moves IPv4 packets between them,
 * applying, per port and direction, a rate cap (serialisation at `rate` with a
 * drop-tail buffer), a one-way delay, jitter and random loss.  This kernel has
 * no netem, so this is where a "long, lossy, reserved-bandwidth path" lives.
 *
 * Model
 *   segment  a broadcast domain (a point-to-point link or a switch);
 *   port     one host's attachment to a segment = one TUN device, with an
 *            "up" shaper (host -> segment) and a "down" shaper (segment -> host).
 *   A packet read from port i is shaped by up[i], forwarded inside its segment
 *   (the other port of a 2-port segment; by destination address otherwise;
 *   multicast and broadcast are copied to every other port), then shaped by
 *   down[j] and written to port j.
 *   Jitter never reorders: delivery times inside one shaper are monotonic.
 *
 * Rules
 *   - It never touches a namespace, a route or an address: the Python lab does.
 *   - It dies with its parent (PDEATHSIG, and EOF on stdin), so its TUN devices,
 *     which are not persistent, vanish with it.
 *   - Control on stdin, one command a line: "down P", "up P", "stats", "quit".
 *     Replies on stdout, one line each; "ready" once all devices exist.
 *
 * Config (argv[1]), one directive a line:
 *   mtu N | seed N
 *   port ID IFNAME SEGMENT ADDR[,ADDR...]|-
 *   shaper ID up|down RATE_BPS DELAY_NS JITTER_NS LOSS BUFFER_BYTES
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#define MAX_PORTS 64
#define MAX_ADDRS 8
#define READ_BATCH 64

typedef struct pkt {
    struct pkt *next;
    int64_t t;     /* when it leaves the shaper it is queued in */
    int len;
    unsigned char data[];
} pkt;

typedef struct {
    double rate_bps;          /* 0 = unlimited */
    int64_t delay_ns, jitter_ns;
    double loss;
    int64_t buffer_bytes;
    int64_t busy_until, last_deliver;
    pkt *head, *tail;
    int queued;
    uint64_t in_pkts, in_bytes, out_pkts, out_bytes, drop_loss, drop_queue, drop_down;
    int port, dir;            /* dir 0 = up (host -> segment), 1 = down */
    int passthrough;
} shaper;

typedef struct {
    int fd, seg, up, naddr;
    char ifname[IFNAMSIZ];
    uint32_t addrs[MAX_ADDRS];
    shaper sh[2];
    uint64_t rx_pkts, no_route;
} port;

static port ports[MAX_PORTS];
static int nports;
static int mtu = 1500;
static pkt *freelist;
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double rnd(void) { /* xorshift64*, uniform in [0, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static pkt *pkt_alloc(void) {
    pkt *p = freelist;
    if (p) {
        freelist = p->next;
        return p;
    }
    p = malloc(sizeof(pkt) + (size_t)mtu + 64);
    if (!p) {
        perror("relay: malloc");
        exit(3);
    }
    return p;
}

static void pkt_free(pkt *p) {
    p->next = freelist;
    freelist = p;
}

static pkt *pkt_copy(const pkt *src) {
    pkt *p = pkt_alloc();
    p->len = src->len;
    memcpy(p->data, src->data, (size_t)src->len);
    return p;
}

static void shaper_enqueue(shaper *s, pkt *p, int64_t now) {
    s->in_pkts++;
    s->in_bytes += (uint64_t)p->len;
    if (s->loss > 0 && rnd() < s->loss) {
        s->drop_loss++;
        pkt_free(p);
        return;
    }
    int64_t done = now;
    if (s->rate_bps > 0) {
        int64_t start = s->busy_until > now ? s->busy_until : now;
        double backlog = (double)(start - now) * s->rate_bps / 8e9;
        if (backlog + p->len > (double)s->buffer_bytes) {
            s->drop_queue++;
            pkt_free(p);
            return;
        }
        done = start + (int64_t)((double)p->len * 8e9 / s->rate_bps);
        s->busy_until = done;
    }
    int64_t t = done + s->delay_ns;
    if (s->jitter_ns > 0) {
        t += (int64_t)((2.0 * rnd() - 1.0) * (double)s->jitter_ns);
        if (t < done) t = done;
    }
    if (t < s->last_deliver) t = s->last_deliver;
    s->last_deliver = t;
    p->t = t;
    p->next = NULL;
    if (s->tail) s->tail->next = p; else s->head = p;
    s->tail = p;
    s->queued++;
}

static void deliver_down(int j, pkt *p, int64_t now) {
    shaper *s = &ports[j].sh[1];
    if (!ports[j].up) {
        s->in_pkts++;
        s->drop_down++;
        pkt_free(p);
        return;
    }
    shaper_enqueue(s, p, now);
}

/* Forward a packet that left up[i] to the down shaper(s) of its segment. */
static void route(int i, pkt *p, int64_t now) {
    int seg = ports[i].seg, members = 0, other = -1;
    for (int j = 0; j < nports; j++)
        if (ports[j].seg == seg && j != i) {
            members++;
            other = j;
        }
    if (members == 1) {
        deliver_down(other, p, now);
        return;
    }
    if (p->len < 20 || (p->data[0] >> 4) != 4) {
        ports[i].no_route++;
        pkt_free(p);
        return;
    }
    uint32_t dst;
    memcpy(&dst, p->data + 16, 4);
    uint32_t hdst = ntohl(dst);
    int flood = (hdst >> 28) == 0xE || hdst == 0xFFFFFFFFu;
    if (!flood) {
        for (int j = 0; j < nports; j++) {
            if (ports[j].seg != seg || j == i) continue;
            for (int k = 0; k < ports[j].naddr; k++)
                if (ports[j].addrs[k] == dst) {
                    deliver_down(j, p, now);
                    return;
                }
        }
        ports[i].no_route++;
        pkt_free(p);
        return;
    }
    int last = -1;
    for (int j = 0; j < nports; j++) {
        if (ports[j].seg != seg || j == i) continue;
        if (last >= 0) deliver_down(last, pkt_copy(p), now);
        last = j;
    }
    if (last >= 0) deliver_down(last, p, now); else pkt_free(p);
}

static void ingress(int i, pkt *p, int64_t now) {
    ports[i].rx_pkts++;
    shaper *s = &ports[i].sh[0];
    if (!ports[i].up) {
        s->in_pkts++;
        s->drop_down++;
        pkt_free(p);
        return;
    }
    if (s->passthrough) {
        s->in_pkts++;
        s->in_bytes += (uint64_t)p->len;
        s->out_pkts++;
        s->out_bytes += (uint64_t)p->len;
        route(i, p, now);
        return;
    }
    shaper_enqueue(s, p, now);
}

/* Release every packet that is due; returns the earliest pending time or -1. */
static int64_t dispatch(int64_t now) {
    int progressed = 1;
    while (progressed) {
        progressed = 0;
        for (int i = 0; i < nports; i++)
            for (int d = 0; d < 2; d++) {
                shaper *s = &ports[i].sh[d];
                while (s->head && s->head->t <= now) {
                    pkt *p = s->head;
                    s->head = p->next;
                    if (!s->head) s->tail = NULL;
                    s->queued--;
                    s->out_pkts++;
                    s->out_bytes += (uint64_t)p->len;
                    if (d == 0) {
                        route(i, p, now);
                        progressed = 1;
                    } else {
                        if (write(ports[i].fd, p->data, (size_t)p->len) < 0 && errno != EAGAIN)
                            s->drop_down++;
                        pkt_free(p);
                    }
                }
            }
    }
    int64_t next = -1;
    for (int i = 0; i < nports; i++)
        for (int d = 0; d < 2; d++) {
            shaper *s = &ports[i].sh[d];
            if (s->head && (next < 0 || s->head->t < next)) next = s->head->t;
        }
    return next;
}

static void flush_port(int i) {
    for (int d = 0; d < 2; d++) {
        shaper *s = &ports[i].sh[d];
        while (s->head) {
            pkt *p = s->head;
            s->head = p->next;
            s->drop_down++;
            pkt_free(p);
        }
        s->tail = NULL;
        s->queued = 0;
    }
}

static void print_shaper(const shaper *s) {
    printf("{\"in_pkts\":%llu,\"in_bytes\":%llu,\"out_pkts\":%llu,\"out_bytes\":%llu,"
           "\"drop_loss\":%llu,\"drop_queue\":%llu,\"drop_down\":%llu,\"queued\":%d}",
           (unsigned long long)s->in_pkts, (unsigned long long)s->in_bytes,
           (unsigned long long)s->out_pkts, (unsigned long long)s->out_bytes,
           (unsigned long long)s->drop_loss, (unsigned long long)s->drop_queue,
           (unsigned long long)s->drop_down, s->queued);
}

static void print_stats(void) {
    printf("{\"ports\":[");
    for (int i = 0; i < nports; i++) {
        printf("%s{\"id\":%d,\"ifname\":\"%s\",\"up\":%s,\"rx_pkts\":%llu,\"no_route\":%llu,\"ingress\":",
               i ? "," : "", i, ports[i].ifname, ports[i].up ? "true" : "false",
               (unsigned long long)ports[i].rx_pkts, (unsigned long long)ports[i].no_route);
        print_shaper(&ports[i].sh[0]);
        printf(",\"egress\":");
        print_shaper(&ports[i].sh[1]);
        printf("}");
    }
    printf("]}\n");
    fflush(stdout);
}

static char ctl_buf[4096];
static size_t ctl_len;

/* Returns 0 to keep running, 1 to quit. */
static int control(void) {
    ssize_t n = read(0, ctl_buf + ctl_len, sizeof(ctl_buf) - 1 - ctl_len);
    if (n == 0) return 1;
    if (n < 0) return errno == EAGAIN || errno == EINTR ? 0 : 1;
    ctl_len += (size_t)n;
    ctl_buf[ctl_len] = 0;
    char *line = ctl_buf, *nl;
    while ((nl = strchr(line, '\n'))) {
        *nl = 0;
        int id;
        if (!strcmp(line, "quit")) return 1;
        if (!strcmp(line, "stats")) {
            print_stats();
        } else if (sscanf(line, "down %d", &id) == 1 && id >= 0 && id < nports) {
            ports[id].up = 0;
            flush_port(id);
            printf("ok down %d\n", id);
        } else if (sscanf(line, "up %d", &id) == 1 && id >= 0 && id < nports) {
            ports[id].up = 1;
            printf("ok up %d\n", id);
        } else if (*line) {
            printf("error unknown command\n");
        }
        fflush(stdout);
        line = nl + 1;
    }
    ctl_len = strlen(line);
    memmove(ctl_buf, line, ctl_len);
    if (ctl_len >= sizeof(ctl_buf) - 1) ctl_len = 0;
    return 0;
}

static int tun_open(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void load_config(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        perror("relay: config");
        exit(2);
    }
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char name[64], addrs[512], dir[8];
        int id, seg;
        double rate, loss;
        long long delay, jitter, buffer;
        unsigned long long seed;
        if (line[0] == '#' || line[0] == '\n') continue;
        if (sscanf(line, "mtu %d", &mtu) == 1) continue;
        if (sscanf(line, "seed %llu", &seed) == 1) {
            rng_state = seed ? seed : 1;
            continue;
        }
        if (sscanf(line, "port %d %63s %d %511s", &id, name, &seg, addrs) == 4) {
            if (id != nports || id >= MAX_PORTS || strlen(name) >= IFNAMSIZ) {
                fprintf(stderr, "relay: bad port line: %s", line);
                exit(2);
            }
            port *pt = &ports[nports++];
            memset(pt, 0, sizeof *pt);
            snprintf(pt->ifname, IFNAMSIZ, "%s", name);
            pt->seg = seg;
            pt->up = 1;
            for (int d = 0; d < 2; d++) {
                pt->sh[d].port = id;
                pt->sh[d].dir = d;
                pt->sh[d].passthrough = 1;
            }
            if (strcmp(addrs, "-")) {
                for (char *tok = strtok(addrs, ","); tok && pt->naddr < MAX_ADDRS; tok = strtok(NULL, ","))
                    if (inet_pton(AF_INET, tok, &pt->addrs[pt->naddr]) == 1) pt->naddr++;
            }
            continue;
        }
        if (sscanf(line, "shaper %d %7s %lf %lld %lld %lf %lld", &id, dir, &rate, &delay, &jitter,
                   &loss, &buffer) == 7) {
            if (id < 0 || id >= nports) {
                fprintf(stderr, "relay: shaper for unknown port: %s", line);
                exit(2);
            }
            shaper *s = &ports[id].sh[strcmp(dir, "up") ? 1 : 0];
            s->rate_bps = rate;
            s->delay_ns = delay;
            s->jitter_ns = jitter;
            s->loss = loss;
            s->buffer_bytes = buffer > 0 ? buffer : 1 << 20;
            s->passthrough = rate <= 0 && delay <= 0 && jitter <= 0 && loss <= 0;
            continue;
        }
        fprintf(stderr, "relay: cannot parse: %s", line);
        exit(2);
    }
    fclose(f);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CONFIG\n", argv[0]);
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    prctl(PR_SET_TIMERSLACK, 1UL);
    signal(SIGPIPE, SIG_IGN);
    load_config(argv[1]);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN};
    for (int i = 0; i < nports; i++) {
        ports[i].fd = tun_open(ports[i].ifname);
        if (ports[i].fd < 0) {
            fprintf(stderr, "relay: cannot create TUN %s: %s\n", ports[i].ifname, strerror(errno));
            return 3;
        }
        ev.data.u32 = (uint32_t)i;
        epoll_ctl(ep, EPOLL_CTL_ADD, ports[i].fd, &ev);
    }
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    ev.data.u32 = 0xFFFFFFFFu;
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    printf("ready %d\n", nports);
    fflush(stdout);

    struct epoll_event evs[MAX_PORTS + 1];
    for (;;) {
        int64_t next = dispatch(now_ns());
        struct timespec ts, *tsp = NULL;
        if (next >= 0) {
            int64_t wait = next - now_ns();
            if (wait < 0) wait = 0;
            ts.tv_sec = wait / 1000000000LL;
            ts.tv_nsec = wait % 1000000000LL;
            tsp = &ts;
        }
        int n = epoll_pwait2(ep, evs, MAX_PORTS + 1, tsp, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("relay: epoll");
            return 4;
        }
        for (int e = 0; e < n; e++) {
            uint32_t i = evs[e].data.u32;
            if (i == 0xFFFFFFFFu) {
                if (control()) return 0;
                continue;
            }
            for (int b = 0; b < READ_BATCH; b++) {
                pkt *p = pkt_alloc();
                ssize_t r = read(ports[i].fd, p->data, (size_t)mtu + 64);
                if (r <= 0) {
                    pkt_free(p);
                    break;
                }
                p->len = (int)r;
                ingress((int)i, p, now_ns());
            }
        }
    }
}
