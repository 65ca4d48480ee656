// An unmodified CUDA C program for the transparent fast path's GPU proof (bench/transparent/run.py), built by
// nvcc (cudart linked statically, nvcc's default). Mode "malloc": 3 x 256 MiB from cudaMalloc; "async": the same
// from cudaMallocAsync (a stream-ordered pool: the driver's checkpoint must move it). Four host threads each launch
// a kernel that adds 1 to every word of their buffer, until "stop" on stdin; then every word is checked against
// the number of launches ("intact" or "corrupt"). "count" on stdin prints the launches so far.
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

__global__ void bump(unsigned *p, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		p[i] += 1;
}

__global__ void check(const unsigned *p, size_t n, unsigned want, unsigned *bad)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		if (p[i] != want)
			atomicAdd(bad, 1);
}

int main(int argc, char **argv)
{
	bool async = argc > 1 && !strcmp(argv[1], "async");
	const size_t n = (256u << 20) / 4;
	std::vector<unsigned *> bufs(4);
	std::vector<long> counts(4);
	std::atomic<bool> stop{false};
	std::atomic<long> total{0};
	cudaStream_t s0;
	cudaStreamCreate(&s0);
	for (int i = 0; i < 4; i++) {
		cudaError_t e = async ? cudaMallocAsync(&bufs[i], n * 4, s0) : cudaMalloc(&bufs[i], n * 4);
		if (e != cudaSuccess) {
			printf("alloc failed: %s\n", cudaGetErrorString(e));
			return 2;
		}
		cudaMemsetAsync(bufs[i], 0, n * 4, s0);
	}
	cudaStreamSynchronize(s0);
	std::vector<std::thread> ts;
	for (int i = 0; i < 4; i++)
		ts.emplace_back([&, i] {
			cudaStream_t s;
			cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
			while (!stop) {
				bump<<<264, 256, 0, s>>>(bufs[i], n);
				cudaStreamSynchronize(s);
				counts[i]++;
				total++;
			}
		});
	printf("ready\n");
	fflush(stdout);
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		if (!strcmp(line, "count\n")) {
			printf("%ld\n", total.load());
			fflush(stdout);
		} else if (!strcmp(line, "stop\n")) {
			break;
		}
	}
	stop = true;
	for (auto &t : ts)
		t.join();
	unsigned *bad;
	cudaMalloc(&bad, 4);
	cudaMemset(bad, 0, 4);
	for (int i = 0; i < 4; i++)
		check<<<264, 256>>>(bufs[i], n, (unsigned)counts[i], bad);
	unsigned nbad = 0;
	cudaMemcpy(&nbad, bad, 4, cudaMemcpyDeviceToHost);
	cudaError_t e = cudaGetLastError();
	printf("%s launches=%ld bad_words=%u err=%s\n", nbad || e ? "corrupt" : "intact", total.load(), nbad,
	       cudaGetErrorString(e));
	return nbad != 0;
}
