#!/bin/sh
# cbid_names.h: CUPTI's driver callback ids -> the function names (from cupti_driver_cbid.h).
set -eu
echo "static const char *cbid_names[] = {"
sed -n 's/^ *CUPTI_DRIVER_TRACE_CBID_\([A-Za-z0-9_]*\) *= *\([0-9]*\),.*/\t[\2] = "\1",/p' "$1" | grep -v '"INVALID"\|"SIZE"\|"FORCE_INT"'
echo "};"
