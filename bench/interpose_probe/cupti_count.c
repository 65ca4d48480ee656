/* Ground truth: counts every driver API call the driver itself saw (CUPTI callbacks, driver domain), whatever
 * way the caller found the entry point. Loaded by the driver through CUDA_INJECTION64_PATH; writes
 * $PROBE_DIR/cupti.PID.txt at exit. cbid_names.h is generated from cupti_driver_cbid.h by run.sh. */
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "cbid_names.h"

static unsigned long counts[CUPTI_DRIVER_TRACE_CBID_SIZE];

static void CUPTIAPI on_call(void *ud, CUpti_CallbackDomain dom, CUpti_CallbackId cbid, const void *data)
{
	const CUpti_CallbackData *d = data;
	if (dom == CUPTI_CB_DOMAIN_DRIVER_API && d->callbackSite == CUPTI_API_ENTER && cbid < CUPTI_DRIVER_TRACE_CBID_SIZE)
		__atomic_fetch_add(&counts[cbid], 1, __ATOMIC_RELAXED);
}

static int ready;

int InitializeInjection(void)
{
	CUpti_SubscriberHandle s;
	if (cuptiSubscribe(&s, on_call, NULL) != CUPTI_SUCCESS ||
	    cuptiEnableDomain(1, s, CUPTI_CB_DOMAIN_DRIVER_API) != CUPTI_SUCCESS) {
		fprintf(stderr, "cupti_count: subscribe failed\n");
		return 0;
	}
	ready = 1;
	return 1;
}

__attribute__((destructor)) static void dump(void)
{
	const char *dir = getenv("PROBE_DIR");
	if (!dir || !ready)
		return;
	char path[512];
	snprintf(path, sizeof path, "%s/cupti.%d.txt", dir, (int)getpid());
	FILE *f = fopen(path, "w");
	if (!f)
		return;
	for (int i = 0; i < CUPTI_DRIVER_TRACE_CBID_SIZE; i++)
		if (counts[i])
			fprintf(f, "count driver %s %lu\n", i < (int)(sizeof cbid_names / sizeof *cbid_names) && cbid_names[i]
				? cbid_names[i] : "?", counts[i]);
	fclose(f);
}
