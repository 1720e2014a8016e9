/* The main thread exits (pthread_exit) while a worker runs on: the process lives
 * with a zombie thread group leader, which ptrace refuses (EPERM) as it refuses
 * any thread that has finished exiting. Prints "ready" once the leader is gone. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static volatile unsigned long calls;

static void *work(void *arg) {
    (void)arg;
    sleep(1); /* the leader is gone by then */
    puts("ready");
    fflush(stdout);
    for (;;) {
        calls++;
        usleep(1000);
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, work, NULL);
    pthread_exit(NULL);
}
