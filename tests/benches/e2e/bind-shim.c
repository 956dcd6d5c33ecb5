/* The LD_PRELOAD shim of the e2e bench (tests/benches/e2e.rs, which writes it out and compiles
 * it with cc): binds each new IPv4 socket to the next address of $LB_BENCH_SOURCES before
 * connect, and writes how often each was used to $LB_BENCH_SHIM_REPORT at exit. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
#define MAX_SOURCES 256

static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static struct in_addr sources[MAX_SOURCES];
static unsigned long used[MAX_SOURCES];
static unsigned long failed;
static int nsources;
static unsigned long next_source;

__attribute__((constructor)) static void shim_init(void) {
    real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    const char *env = getenv("LB_BENCH_SOURCES");
    if (!env) return;
    char buf[8192];
    strncpy(buf, env, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    char *save = NULL;
    for (char *t = strtok_r(buf, ",", &save); t && nsources < MAX_SOURCES; t = strtok_r(NULL, ",", &save))
        if (inet_pton(AF_INET, t, &sources[nsources]) == 1) nsources++;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    if (addr && addr->sa_family == AF_INET && nsources > 0) {
        unsigned long k = __atomic_fetch_add(&next_source, 1, __ATOMIC_RELAXED) % nsources;
        struct sockaddr_in src;
        memset(&src, 0, sizeof src);
        src.sin_family = AF_INET;
        src.sin_addr = sources[k];
        int one = 1;
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (const struct sockaddr *)&src, sizeof src) == 0)
            __atomic_fetch_add(&used[k], 1, __ATOMIC_RELAXED);
        else
            __atomic_fetch_add(&failed, 1, __ATOMIC_RELAXED);
    }
    return real_connect(fd, addr, len);
}

__attribute__((destructor)) static void shim_report(void) {
    const char *path = getenv("LB_BENCH_SHIM_REPORT");
    if (!path || nsources == 0) return;
    FILE *f = fopen(path, "w");
    if (!f) return;
    char text[INET_ADDRSTRLEN];
    for (int k = 0; k < nsources; k++)
        if (inet_ntop(AF_INET, &sources[k], text, sizeof text))
            fprintf(f, "%s %lu\n", text, used[k]);
    fprintf(f, "failed %lu\n", failed);
    fclose(f);
}
