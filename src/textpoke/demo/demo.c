/* textpoke's bundled demo: a small multithreaded "order pipeline".
 *
 * Three workers process orders forever; each order goes through a few
 * functions, some only for some orders, so their call counts differ.  Built
 * with -pg -mfentry -mnop-mcount every function starts with a nop5 that
 * textpoke can turn into a call while the program runs.  On SIGTERM or SIGINT
 * it prints "orders=N checks=ok|BAD" and exits 0.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>

static atomic_int stop;
static atomic_long orders, wrong;

struct order { long id, qty, cents, total; };

__attribute__((noinline)) void parse_order(struct order *o, long id) { o->id = id; o->qty = 1 + id % 7; o->cents = 199 + id % 1000; }
__attribute__((noinline)) int validate(const struct order *o) { return o->qty > 0 && o->cents > 0; }
__attribute__((noinline)) long price(const struct order *o) { return o->qty * o->cents; }
__attribute__((noinline)) long apply_discount(long total) { return total - total / 10; }
__attribute__((noinline)) long compute_tax(long total) { return total + total * 8 / 100; }
__attribute__((noinline)) void ship(struct order *o) { o->total += 500; }
__attribute__((noinline)) void audit_log(const struct order *o) { if (o->total < 0) atomic_fetch_add(&wrong, 1); }

__attribute__((noinline)) long process_order(long id) {
    struct order o = {0};
    parse_order(&o, id);
    if (!validate(&o)) return -1;
    long total = price(&o);
    if (id % 3 == 0) total = apply_discount(total);
    o.total = compute_tax(total);
    if (id % 10 == 0) ship(&o);
    if (id % 100 == 0) audit_log(&o);
    return o.total;
}

static void *worker(void *arg) {
    long id = (long)arg * 1000000000L;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        if (process_order(id++) < 0) atomic_fetch_add(&wrong, 1);
        atomic_fetch_add_explicit(&orders, 1, memory_order_relaxed);
        if ((id & 1023) == 0) usleep(50); /* leave the machine some air */
    }
    return NULL;
}

static void on_signal(int sig) { (void)sig; atomic_store(&stop, 1); }

int main(void) {
    pthread_t t[3];
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    for (long i = 0; i < 3; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    printf("ready %d\n", getpid());
    fflush(stdout);
    while (!atomic_load(&stop)) pause();
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    printf("orders=%ld checks=%s\n", atomic_load(&orders), atomic_load(&wrong) ? "BAD" : "ok");
    return 0;
}
