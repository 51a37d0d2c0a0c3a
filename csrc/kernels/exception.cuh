// Error handling shared by host and device code. No torch headers anywhere in csrc/.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace largeep {

// Thrown by HOST_ASSERT and the CUDA checks; pybind11 turns it into a Python RuntimeError.
class Error : public std::runtime_error {
   public:
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

inline std::string where(const char* file, int line) {
    std::ostringstream os;
    os << " (" << file << ":" << line << ")";
    return os.str();
}

}  // namespace largeep

#define HOST_ASSERT(cond, msg)                                                              \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            std::ostringstream os_;                                                         \
            os_ << "largeep: " << msg << " [" #cond "]" << ::largeep::where(__FILE__, __LINE__); \
            throw ::largeep::Error(os_.str());                                              \
        }                                                                                   \
    } while (0)

#define CUDA_CHECK(call)                                                                              \
    do {                                                                                              \
        cudaError_t e_ = (call);                                                                      \
        if (e_ != cudaSuccess) {                                                                      \
            std::ostringstream os_;                                                                   \
            os_ << "largeep: CUDA error " << cudaGetErrorName(e_) << ": " << cudaGetErrorString(e_) \
                << " in " #call << ::largeep::where(__FILE__, __LINE__);                              \
            throw ::largeep::Error(os_.str());                                                        \
        }                                                                                             \
    } while (0)

// Checks the launch that just happened (configuration errors; faults show up at the next sync).
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

#ifdef __CUDACC__
#define DEVICE_ASSERT(cond)                                                          \
    do {                                                                             \
        if (!(cond)) {                                                               \
            printf("largeep device assertion failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
            asm volatile("trap;");                                                   \
        }                                                                            \
    } while (0)
#endif
