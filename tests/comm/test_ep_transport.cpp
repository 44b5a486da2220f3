// parallel.ep_transport / --ep-transport, parallel.ep_dispatch / --ep-dispatch and
// parallel.ep_overlap / --ep-overlap: the names parse both ways, anything else is bad input naming
// where it came from and the choices.
#include <gtest/gtest.h>

#include <string>

#include "src/comm/ep_transport.h"
#include "tests/support/expect_error.h"

using namespace switchyard;
using namespace switchyard::testing;

TEST(EpTransport, NamesRoundTrip) {
  for (EpTransport transport : {EpTransport::automatic, EpTransport::nccl, EpTransport::nvlink})
    EXPECT_EQ(parse_ep_transport(ep_transport_name(transport), "test"), transport);
  EXPECT_STREQ(ep_transport_name(EpTransport::automatic), "auto");
}

TEST(EpTransport, UnknownNameIsBadInputNamingTheSourceAndChoices) {
  expect_bad_input([] { parse_ep_transport("infiniband", "bench ep: --ep-transport"); },
                   {"bench ep: --ep-transport", "infiniband", "auto, nccl, nvlink"});
  expect_bad_input([] { parse_ep_transport("", "parallel.ep_transport"); }, "parallel.ep_transport");
}

// parallel.ep_dispatch / --ep-dispatch likewise.
TEST(EpDispatch, NamesRoundTrip) {
  for (EpDispatch dispatch : {EpDispatch::activation, EpDispatch::fp8})
    EXPECT_EQ(parse_ep_dispatch(ep_dispatch_name(dispatch), "test"), dispatch);
  EXPECT_STREQ(ep_dispatch_name(EpDispatch::activation), "activation");
  EXPECT_STREQ(ep_dispatch_name(EpDispatch::fp8), "fp8");
}

TEST(EpDispatch, UnknownNameIsBadInputNamingTheSourceAndChoices) {
  expect_bad_input([] { parse_ep_dispatch("bf16", "bench ep: --ep-dispatch"); },
                   {"bench ep: --ep-dispatch", "bf16", "activation, fp8"});
  expect_bad_input([] { parse_ep_dispatch("", "parallel.ep_dispatch"); }, "parallel.ep_dispatch");
}

// parallel.ep_overlap / --ep-overlap likewise.
TEST(EpOverlap, NamesRoundTrip) {
  for (EpOverlap overlap : {EpOverlap::none, EpOverlap::two_part})
    EXPECT_EQ(parse_ep_overlap(ep_overlap_name(overlap), "test"), overlap);
  EXPECT_STREQ(ep_overlap_name(EpOverlap::two_part), "two_part");
}

TEST(EpOverlap, UnknownNameIsBadInputNamingTheSourceAndChoices) {
  expect_bad_input([] { parse_ep_overlap("dual", "bench ep: --ep-overlap"); },
                   {"bench ep: --ep-overlap", "dual", "none, two_part"});
  expect_bad_input([] { parse_ep_overlap("", "parallel.ep_overlap"); }, "parallel.ep_overlap");
}
