/* The driver entry points the probe counts: everything that allocates, frees, maps, enqueues work or waits.
 * X(name) — name as libcuda exports it (the versioned symbol the driver's cuGetProcAddress hands out). */
#define TRACKED(X) \
	X(cuMemAlloc_v2) X(cuMemAllocPitch_v2) X(cuMemAllocManaged) X(cuMemAllocAsync) X(cuMemAllocAsync_ptsz) \
	X(cuMemAllocFromPoolAsync) X(cuMemAllocFromPoolAsync_ptsz) X(cuMemHostAlloc) X(cuMemAllocHost_v2) \
	X(cuMemFree_v2) X(cuMemFreeAsync) X(cuMemFreeAsync_ptsz) X(cuMemFreeHost) \
	X(cuMemCreate) X(cuMemRelease) X(cuMemMap) X(cuMemUnmap) X(cuMemAddressReserve) X(cuMemAddressFree) \
	X(cuMemSetAccess) X(cuMemMapArrayAsync) X(cuMemMapArrayAsync_ptsz) \
	X(cuLaunchKernel) X(cuLaunchKernel_ptsz) X(cuLaunchKernelEx) X(cuLaunchKernelEx_ptsz) \
	X(cuLaunchCooperativeKernel) X(cuLaunchCooperativeKernel_ptsz) X(cuLaunchHostFunc) X(cuLaunchHostFunc_ptsz) \
	X(cuGraphLaunch) X(cuGraphLaunch_ptsz) X(cuGraphInstantiateWithFlags) X(cuStreamBeginCapture_v2) \
	X(cuMemcpy) X(cuMemcpy_ptds) X(cuMemcpyAsync) X(cuMemcpyAsync_ptsz) \
	X(cuMemcpyHtoD_v2) X(cuMemcpyHtoD_v2_ptds) X(cuMemcpyDtoH_v2) X(cuMemcpyDtoH_v2_ptds) \
	X(cuMemcpyDtoD_v2) X(cuMemcpyDtoD_v2_ptds) X(cuMemcpyHtoDAsync_v2) X(cuMemcpyHtoDAsync_v2_ptsz) \
	X(cuMemcpyDtoHAsync_v2) X(cuMemcpyDtoHAsync_v2_ptsz) X(cuMemcpyDtoDAsync_v2) X(cuMemcpyDtoDAsync_v2_ptsz) \
	X(cuMemcpy2DAsync_v2) X(cuMemcpy2DAsync_v2_ptsz) X(cuMemcpy3DAsync_v2) X(cuMemcpyPeerAsync) \
	X(cuMemcpyBatchAsync) X(cuMemcpyBatchAsync_ptsz) \
	X(cuMemsetD8_v2) X(cuMemsetD32_v2) X(cuMemsetD8Async) X(cuMemsetD8Async_ptsz) X(cuMemsetD16Async) \
	X(cuMemsetD32Async) X(cuMemsetD32Async_ptsz) X(cuMemsetD2D8Async) \
	X(cuStreamSynchronize) X(cuStreamSynchronize_ptsz) X(cuCtxSynchronize) X(cuCtxSynchronize_v2) X(cuEventSynchronize) \
	X(cuStreamWaitEvent) X(cuStreamWaitEvent_ptsz) X(cuEventRecord) X(cuEventRecord_ptsz) \
	X(cuStreamQuery) X(cuEventQuery) X(cuMemGetInfo_v2) X(cuCtxCreate_v2) X(cuDevicePrimaryCtxRetain) \
	X(cuModuleLoadData) X(cuModuleLoadDataEx) X(cuLibraryLoadData) X(cuModuleGetFunction) X(cuLibraryGetKernel) \
	X(cuIpcGetMemHandle) X(cuMemExportToShareableHandle) X(cuMemPoolCreate) X(cuDeviceGetDefaultMemPool)

/* The subset the gate wraps (the calls that enqueue work), with their real signatures (probe.c). */
