// SVG plots written by switchyard itself (no plotting library, no external tool): line charts for
// training curves and heatmaps for expert load and specialization. Each function returns one
// self-contained <svg> element (inline styles, no scripts, no external references) that a browser
// shows inside an HTML page and rsvg-convert / Inkscape render to PNG.
//
// Line chart: linear axes with "nice" ticks (1, 2, 5 x 10^n) over the data range (y padded by 5%),
// light grid, one polyline per series broken at non-finite values, optional point markers, legend
// above the plot. A series longer than 3 points per horizontal pixel is reduced to the mean of each
// pixel's points, which keeps the file small and the curve readable. A few far-out values (a loss
// spike) do not set the y range (robust_axis_range): the lines run off the edge there, a triangle
// on the edge marks each such point (hover: its true value) and a note under the plot counts them.
// Every <svg> has a viewBox, so a page may scale it down (CSS max-width: 100%; height: auto).
// Heatmap: one rectangle per cell with a hover title; colour from a sequential scale (viridis,
// low..high), a diverging one for ratios (blue < 1 < red on a log scale, white at 1) or one for
// signed values (blue < 0 < red, linear, symmetric about 0); a colour
// bar with ticks on the right; row and column labels thinned to fit; optional value text in cells
// large enough to hold it. Non-finite cells are drawn light grey ("no data").
#pragma once

#include <limits>
#include <string>
#include <vector>

namespace switchyard {

struct PlotSeries {
  std::string name;
  std::vector<double> x, y;
  std::string color;     // CSS colour; empty: the palette colour of the series' index
  bool markers = false;  // draw a dot at each point (sparse series such as validation loss)
  bool dashed = false;
  double width = 1.6;  // stroke width in pixels
  double opacity = 1.0;
};

struct LineChartOptions {
  std::string title, x_label, y_label;
  int width = 760, height = 320;
  bool y_from_zero = false;  // include 0 in the y range
  // Hard bounds of the y axis for bounded quantities (fractions, percentages): padding and tick
  // rounding never go past them. NaN: none.
  double y_floor = std::numeric_limits<double>::quiet_NaN();
  double y_ceiling = std::numeric_limits<double>::quiet_NaN();
  bool clip_outliers = true;  // the y range from robust_axis_range rather than the extremes
};

// The y range a chart of `values` shows. With at least 20 finite values, the bulk is the range
// from the second-smallest to the second-largest (the 2nd and 98th percentiles on longer series);
// a side is clipped when a value lies more than half the bulk's width beyond it, and then ends
// there (bulk edge + half its width). Otherwise the range is the finite min and max.
struct AxisRange {
  double low = std::numeric_limits<double>::quiet_NaN(), high = std::numeric_limits<double>::quiet_NaN();
  bool clipped_low = false, clipped_high = false;
};
AxisRange robust_axis_range(const std::vector<double>& values);

std::string svg_line_chart(const std::vector<PlotSeries>& series, const LineChartOptions& options);

// diverging_signed: signed values (a router bias), linear, blue < 0 < red, white at 0.
enum class HeatmapScale { sequential, diverging_ratio, diverging_signed };

struct HeatmapOptions {
  std::string title, x_label, y_label;
  std::vector<std::string> row_labels, column_labels;
  HeatmapScale scale = HeatmapScale::sequential;
  // sequential: colour range (auto from the data when low >= high). diverging_ratio: the ratio at
  // the ends of the scale (1 / ratio_limit .. ratio_limit; values beyond are clamped).
  // diverging_signed: the scale runs from -high to high (auto when high <= 0: the largest |value|).
  double low = 0.0, high = 0.0;
  double ratio_limit = 4.0;
  std::string colorbar_label;
  std::string value_format = "%.2g";  // printf format of cell text and hover titles
  bool annotate = false;              // print values inside cells when they fit
  // Optional per-cell hover text (same shape as the values); empty: "row, column: value".
  std::vector<std::vector<std::string>> cell_titles;
  int max_width = 900;  // the plot area is at most this wide (cells shrink to fit)
  int cell_height = 0;  // 0: chosen from the row count
};

// values[row][column]; every row has the same length.
std::string svg_heatmap(const std::vector<std::vector<double>>& values, const HeatmapOptions& options);

// Helpers shared with the HTML report.
std::string xml_escape(const std::string& text);
std::string format_number(double value, const char* format);  // printf with one double
std::string palette_color(size_t index);                      // a categorical colour
std::string sequential_color(double fraction);                // viridis, fraction in [0, 1]
std::string diverging_color(double fraction);                 // fraction in [-1, 1]: blue, white, red
// "Nice" axis ticks covering [low, high], about `target` of them.
std::vector<double> nice_ticks(double low, double high, int target);

}  // namespace switchyard
