// The two EpExchange transports (src/comm/ep_exchange.h), for EpExchange::create only.
#pragma once

#include <memory>

#include "src/comm/ep_exchange.h"
#include "src/comm/nvlink_exchange.h"

namespace switchyard {

std::unique_ptr<EpExchange> make_nccl_ep_exchange(std::shared_ptr<Communicator> expert_parallel,
                                                  const EpExchangeOptions& options);
// `peers`: created by EpExchange::create over the same group, with kNvlinkExchangeRegions regions.
std::unique_ptr<EpExchange> make_nvlink_ep_exchange(std::shared_ptr<Communicator> expert_parallel,
                                                    const EpExchangeOptions& options,
                                                    std::unique_ptr<NvlinkPeerMemory> peers);

// The nvlink transport's peer-mapped regions: the padded expert layout's input rows (the dispatch
// writes them) and output rows (the combine reads them; backward writes the output-row gradients
// there and reads back the input-row gradients), and every rank's per-expert row counts (the
// count exchange).
constexpr int kNvlinkInputRegion = 0, kNvlinkOutputRegion = 1, kNvlinkCountRegion = 2, kNvlinkExchangeRegions = 3;

}  // namespace switchyard
