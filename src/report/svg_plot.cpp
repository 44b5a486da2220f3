// SVG line charts and heatmaps (src/report/svg_plot.h).
#include "src/report/svg_plot.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

namespace switchyard {
namespace {

constexpr double kCharWidth = 6.6;  // approximate width of one 11px sans-serif character
const char* kFont = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

struct Rgb {
  double red, green, blue;
};

std::string rgb_text(const Rgb& color) {
  char buffer[16];
  std::snprintf(buffer, sizeof(buffer), "#%02x%02x%02x", int(std::lround(std::clamp(color.red, 0.0, 255.0))),
                int(std::lround(std::clamp(color.green, 0.0, 255.0))),
                int(std::lround(std::clamp(color.blue, 0.0, 255.0))));
  return buffer;
}

// Piecewise-linear interpolation between evenly spaced anchors, fraction in [0, 1].
Rgb interpolate(const std::vector<Rgb>& anchors, double fraction) {
  if (!std::isfinite(fraction)) fraction = 0.0;
  fraction = std::clamp(fraction, 0.0, 1.0);
  const double position = fraction * double(anchors.size() - 1);
  const size_t index = std::min(anchors.size() - 2, size_t(position));
  const double weight = position - double(index);
  const Rgb& a = anchors[index];
  const Rgb& b = anchors[index + 1];
  return {a.red + (b.red - a.red) * weight, a.green + (b.green - a.green) * weight,
          a.blue + (b.blue - a.blue) * weight};
}

double luminance(const Rgb& color) { return 0.299 * color.red + 0.587 * color.green + 0.114 * color.blue; }

Rgb parse_rgb(const std::string& text) {
  unsigned red = 0, green = 0, blue = 0;
  if (text.size() == 7 && std::sscanf(text.c_str(), "#%02x%02x%02x", &red, &green, &blue) == 3)
    return {double(red), double(green), double(blue)};
  return {0, 0, 0};
}

const std::vector<Rgb>& viridis() {
  static const std::vector<Rgb> anchors = {{68, 1, 84},    {71, 44, 122},  {59, 81, 139},
                                           {44, 113, 142}, {33, 144, 141}, {39, 173, 129},
                                           {92, 200, 99},  {170, 220, 50}, {253, 231, 37}};
  return anchors;
}

const std::vector<Rgb>& red_blue() {
  static const std::vector<Rgb> anchors = {{33, 102, 172},  {103, 169, 207}, {209, 229, 240}, {247, 247, 247},
                                           {253, 219, 199}, {239, 138, 98},  {178, 24, 43}};
  return anchors;
}

// Tick text: enough decimals for the step, thousands as "k" / millions as "M" on large integer axes.
std::string tick_text(double value, double step) {
  if (std::fabs(value) < step * 1e-9) value = 0.0;
  char buffer[32];
  if (step >= 1000.0 && std::fabs(value) >= 1e6 && std::fmod(std::fabs(value), 1e5) == 0.0) {
    std::snprintf(buffer, sizeof(buffer), "%gM", value / 1e6);
  } else if (step >= 100.0 && std::fabs(value) >= 1e4 && std::fmod(std::fabs(value), 100.0) == 0.0) {
    std::snprintf(buffer, sizeof(buffer), "%gk", value / 1e3);
  } else {
    const int decimals = step >= 1.0 ? 0 : std::min(8, int(std::ceil(-std::log10(step) - 1e-9)));
    std::snprintf(buffer, sizeof(buffer), "%.*f", decimals, value);
  }
  return buffer;
}

double nice_step(double range, int target) {
  const double raw = range / double(std::max(1, target));
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double normalized = raw / magnitude;
  const double nice = normalized < 1.5 ? 1.0 : normalized < 3.0 ? 2.0 : normalized < 7.0 ? 5.0 : 10.0;
  return nice * magnitude;
}

std::string text_element(double x, double y, const std::string& text, const char* anchor, int size,
                         const std::string& extra = "") {
  std::ostringstream out;
  out << "<text x=\"" << format_number(x, "%.1f") << "\" y=\"" << format_number(y, "%.1f") << "\" " << kFont
      << " font-size=\"" << size << "\" text-anchor=\"" << anchor << "\"" << (extra.empty() ? "" : " ") << extra << ">"
      << xml_escape(text) << "</text>";
  return out.str();
}

// Reduces a series to at most `buckets` points: the mean x and y of the points in each x bucket.
void reduce_series(const std::vector<double>& xs, const std::vector<double>& ys, double x_low, double x_high,
                   int buckets, std::vector<double>& out_x, std::vector<double>& out_y) {
  std::vector<double> sum_x(size_t(buckets), 0.0), sum_y(size_t(buckets), 0.0);
  std::vector<int> count(size_t(buckets), 0);
  for (size_t index = 0; index < xs.size() && index < ys.size(); ++index) {
    if (!std::isfinite(xs[index]) || !std::isfinite(ys[index])) continue;
    const double fraction = x_high > x_low ? (xs[index] - x_low) / (x_high - x_low) : 0.0;
    const size_t bucket = std::min(size_t(buckets - 1), size_t(std::max(0.0, fraction * buckets)));
    sum_x[bucket] += xs[index];
    sum_y[bucket] += ys[index];
    ++count[bucket];
  }
  for (int bucket = 0; bucket < buckets; ++bucket) {
    if (count[size_t(bucket)] == 0) continue;
    out_x.push_back(sum_x[size_t(bucket)] / count[size_t(bucket)]);
    out_y.push_back(sum_y[size_t(bucket)] / count[size_t(bucket)]);
  }
}

struct OffScale {
  int points = 0;
  double farthest = 0, distance = -1;  // the value farthest outside the range, and how far
};

// Edge markers for the points of one series outside [y_low, y_high]: neighbours closer than 9 px
// on the same edge share one marker, whose hover title lists them. Adds them to `tally`.
template <typename MapX>
void off_scale_markers(std::ostream& out, const std::string& name, const std::string& color,
                       const std::vector<double>& xs, const std::vector<double>& ys, double y_low, double y_high,
                       const MapX& map_x, double top, double bottom, OffScale& tally) {
  size_t point = 0;
  const size_t count = std::min(xs.size(), ys.size());
  auto outside = [&](size_t at) {
    return std::isfinite(xs[at]) && std::isfinite(ys[at]) && (ys[at] > y_high || ys[at] < y_low);
  };
  while (point < count) {
    if (!outside(point)) {
      ++point;
      continue;
    }
    const bool above = ys[point] > y_high;
    const double x = map_x(xs[point]);
    std::string title = name;
    int in_group = 0;
    for (; point < count && outside(point) && (ys[point] > y_high) == above && map_x(xs[point]) - x < 9.0; ++point) {
      title += (in_group++ ? "; " : " at ") + tick_text(xs[point], 1.0) + ": " + format_number(ys[point], "%.4g");
      const double distance = above ? ys[point] - y_high : y_low - ys[point];
      if (distance > tally.distance) {
        tally.distance = distance;
        tally.farthest = ys[point];
      }
      ++tally.points;
    }
    title += above ? " (above the axis)" : " (below the axis)";
    const double edge = above ? top : bottom, tip = above ? -1.0 : 1.0;
    out << "<path class=\"off-scale\" d=\"M" << format_number(x - 4.5, "%.1f") << ","
        << format_number(edge - 7.0 * tip, "%.1f") << " L" << format_number(x, "%.1f") << ","
        << format_number(edge + tip, "%.1f") << " L" << format_number(x + 4.5, "%.1f") << ","
        << format_number(edge - 7.0 * tip, "%.1f") << " Z\" fill=\"" << color
        << "\" stroke=\"#222\" stroke-width=\"0.8\"><title>" << xml_escape(title) << "</title></path>\n";
  }
}

}  // namespace

std::string xml_escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        // Control characters are not allowed in XML 1.0 text: show them as U+FFFD.
        if ((unsigned char)c < 0x20 && c != '\n' && c != '\t')
          out += "\xEF\xBF\xBD";
        else
          out += c;
    }
  }
  return out;
}

std::string format_number(double value, const char* format) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), format, value);
  return buffer;
}

std::string palette_color(size_t index) {
  static const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  return colors[index % 10];
}

std::string sequential_color(double fraction) { return rgb_text(interpolate(viridis(), fraction)); }

std::string diverging_color(double fraction) {
  if (!std::isfinite(fraction)) fraction = 0.0;
  return rgb_text(interpolate(red_blue(), (std::clamp(fraction, -1.0, 1.0) + 1.0) / 2.0));
}

std::vector<double> nice_ticks(double low, double high, int target) {
  std::vector<double> ticks;
  if (!std::isfinite(low) || !std::isfinite(high)) return ticks;
  if (high <= low) {
    const double pad = low != 0.0 ? std::fabs(low) * 0.5 : 1.0;
    low -= pad;
    high += pad;
  }
  const double step = nice_step(high - low, target);
  const double first = std::ceil(low / step - 1e-9) * step;
  // first + i * step (not repeated addition, which drifts).
  for (int index = 0; index < 100; ++index) {
    const double tick = first + double(index) * step;
    if (tick > high + step * 1e-9) break;
    ticks.push_back(std::fabs(tick) < step * 1e-9 ? 0.0 : tick);
  }
  return ticks;
}

AxisRange robust_axis_range(const std::vector<double>& values) {
  std::vector<double> sorted;
  for (double value : values)
    if (std::isfinite(value)) sorted.push_back(value);
  AxisRange range;
  if (sorted.empty()) return range;
  std::sort(sorted.begin(), sorted.end());
  range.low = sorted.front();
  range.high = sorted.back();
  if (sorted.size() < 20) return range;  // too few to call any of them an outlier
  const double last = double(sorted.size() - 1);
  const double bulk_low = sorted[size_t(std::ceil(0.02 * last))];
  const double bulk_high = sorted[size_t(std::floor(0.98 * last))];
  const double slack = 0.5 * (bulk_high - bulk_low);
  if (range.high > bulk_high + slack) {
    range.high = bulk_high + slack;
    range.clipped_high = true;
  }
  if (range.low < bulk_low - slack) {
    range.low = bulk_low - slack;
    range.clipped_low = true;
  }
  return range;
}

// ---- Line chart ------------------------------------------------------------------------------

std::string svg_line_chart(const std::vector<PlotSeries>& series, const LineChartOptions& options) {
  const double width = options.width, height = options.height;
  const double left = 64, right = 18, top = options.title.empty() ? 30 : 48, bottom = 44;
  const double plot_width = width - left - right, plot_height = height - top - bottom;
  double x_low = std::numeric_limits<double>::infinity(), x_high = -x_low, y_low = x_low, y_high = -x_low;
  for (const PlotSeries& one : series)
    for (size_t index = 0; index < one.x.size() && index < one.y.size(); ++index) {
      if (!std::isfinite(one.x[index]) || !std::isfinite(one.y[index])) continue;
      x_low = std::min(x_low, one.x[index]);
      x_high = std::max(x_high, one.x[index]);
      y_low = std::min(y_low, one.y[index]);
      y_high = std::max(y_high, one.y[index]);
    }
  std::ostringstream out;
  out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << options.width << "\" height=\"" << options.height
      << "\" viewBox=\"0 0 " << options.width << " " << options.height << "\">\n";
  out << "<rect x=\"0\" y=\"0\" width=\"" << options.width << "\" height=\"" << options.height
      << "\" fill=\"#ffffff\"/>\n";
  if (!options.title.empty())
    out << text_element(left, 18, options.title, "start", 14, "font-weight=\"bold\" fill=\"#222\"") << "\n";
  const bool has_data = std::isfinite(x_low) && std::isfinite(y_low);
  if (!has_data) {
    out << text_element(width / 2, height / 2, "no data", "middle", 13, "fill=\"#888\"") << "\n</svg>\n";
    return out.str();
  }
  if (options.clip_outliers) {
    std::vector<double> all_y;
    for (const PlotSeries& one : series)
      for (size_t index = 0; index < one.x.size() && index < one.y.size(); ++index)
        if (std::isfinite(one.x[index])) all_y.push_back(one.y[index]);
    const AxisRange range = robust_axis_range(all_y);
    y_low = range.low;
    y_high = range.high;
  }
  if (options.y_from_zero) {
    y_low = std::min(y_low, 0.0);
    y_high = std::max(y_high, 0.0);
  }
  const double y_pad = y_high > y_low ? 0.05 * (y_high - y_low) : 0.0;
  const bool zero_floor = y_low >= 0.0 && (options.y_from_zero || y_low - y_pad < 0.0);
  y_low = zero_floor ? std::max(0.0, y_low - y_pad) : y_low - y_pad;
  y_high += y_pad;
  std::vector<double> x_ticks = nice_ticks(x_low, x_high, std::max(2, int(plot_width / 90)));
  std::vector<double> y_ticks = nice_ticks(y_low, y_high, std::max(2, int(plot_height / 50)));
  const double x_step = x_ticks.size() > 1 ? x_ticks[1] - x_ticks[0] : 1.0;
  const double y_step = y_ticks.size() > 1 ? y_ticks[1] - y_ticks[0] : 1.0;
  // Axes end on a tick (or on the data when that is wider).
  x_low = std::min(x_low, x_ticks.empty() ? x_low : std::floor(x_low / x_step + 1e-9) * x_step);
  x_high = std::max(x_high, x_ticks.empty() ? x_high : std::ceil(x_high / x_step - 1e-9) * x_step);
  y_low = std::min(y_low, std::floor(y_low / y_step + 1e-9) * y_step);
  y_high = std::max(y_high, std::ceil(y_high / y_step - 1e-9) * y_step);
  if (x_high <= x_low) {
    x_low -= 1.0;
    x_high += 1.0;
  }
  if (y_high <= y_low) {
    y_low -= 1.0;
    y_high += 1.0;
  }
  if (std::isfinite(options.y_floor)) y_low = std::max(y_low, options.y_floor);
  if (std::isfinite(options.y_ceiling)) y_high = std::min(y_high, options.y_ceiling);
  if (y_high <= y_low) y_high = y_low + 1.0;
  x_ticks = nice_ticks(x_low, x_high, std::max(2, int(plot_width / 90)));
  y_ticks = nice_ticks(y_low, y_high, std::max(2, int(plot_height / 50)));
  auto map_x = [&](double x) { return left + (x - x_low) / (x_high - x_low) * plot_width; };
  auto map_y = [&](double y) { return top + plot_height - (y - y_low) / (y_high - y_low) * plot_height; };

  // Grid, ticks and labels.
  out << "<g stroke=\"#e3e3e3\" stroke-width=\"1\">\n";
  for (double tick : x_ticks)
    out << "<line x1=\"" << format_number(map_x(tick), "%.1f") << "\" y1=\"" << top << "\" x2=\""
        << format_number(map_x(tick), "%.1f") << "\" y2=\"" << top + plot_height << "\"/>\n";
  for (double tick : y_ticks)
    out << "<line x1=\"" << left << "\" y1=\"" << format_number(map_y(tick), "%.1f") << "\" x2=\"" << left + plot_width
        << "\" y2=\"" << format_number(map_y(tick), "%.1f") << "\"/>\n";
  out << "</g>\n";
  out << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << plot_width << "\" height=\"" << plot_height
      << "\" fill=\"none\" stroke=\"#888\" stroke-width=\"1\"/>\n";
  for (double tick : x_ticks)
    out << text_element(map_x(tick), top + plot_height + 15, tick_text(tick, x_step), "middle", 11, "fill=\"#444\"")
        << "\n";
  for (double tick : y_ticks)
    out << text_element(left - 6, map_y(tick) + 4, tick_text(tick, y_step), "end", 11, "fill=\"#444\"") << "\n";
  if (!options.x_label.empty())
    out << text_element(left + plot_width / 2, height - 8, options.x_label, "middle", 12, "fill=\"#333\"") << "\n";
  if (!options.y_label.empty()) {
    const std::string rotate =
        "transform=\"rotate(-90 14 " + format_number(top + plot_height / 2, "%.1f") + ")\" fill=\"#333\"";
    out << text_element(14, top + plot_height / 2, options.y_label, "middle", 12, rotate) << "\n";
  }

  // Series, clipped to the plot area.
  // Ids are unique per process: several charts inline in one HTML page share one id namespace.
  static std::atomic<int> next_clip_id{0};
  const std::string clip_id = "sy-plot-area-" + std::to_string(next_clip_id.fetch_add(1));
  // 4 px of margin: a line or marker on the frame (a fraction at 1, say) stays whole.
  out << "<defs><clipPath id=\"" << clip_id << "\"><rect x=\"" << left - 4 << "\" y=\"" << top - 4 << "\" width=\""
      << plot_width + 8 << "\" height=\"" << plot_height + 8 << "\"/></clipPath></defs>\n<g clip-path=\"url(#" << clip_id
      << ")\" fill=\"none\">\n";
  const int buckets = std::max(1, int(plot_width));
  std::vector<std::vector<double>> drawn_x(series.size()), drawn_y(series.size());
  for (size_t index = 0; index < series.size(); ++index) {
    const PlotSeries& one = series[index];
    const std::string color = one.color.empty() ? palette_color(index) : one.color;
    std::vector<double>& xs = drawn_x[index];
    std::vector<double>& ys = drawn_y[index];
    if (one.x.size() > size_t(3 * buckets)) {
      reduce_series(one.x, one.y, x_low, x_high, buckets, xs, ys);
    } else {
      xs = one.x;
      ys = one.y;
    }
    std::string style = "stroke=\"" + color + "\" stroke-width=\"" + format_number(one.width, "%.2g") +
                        "\" stroke-linejoin=\"round\" stroke-opacity=\"" + format_number(one.opacity, "%.2g") + "\"";
    if (one.dashed) style += " stroke-dasharray=\"5 3\"";
    std::ostringstream points;
    size_t in_run = 0;
    auto flush = [&] {
      if (in_run >= 2) out << "<polyline " << style << " points=\"" << points.str() << "\"/>\n";
      points.str("");
      in_run = 0;
    };
    for (size_t point = 0; point < xs.size() && point < ys.size(); ++point) {
      if (!std::isfinite(xs[point]) || !std::isfinite(ys[point])) {
        flush();
        continue;
      }
      points << (in_run ? " " : "") << format_number(map_x(xs[point]), "%.1f") << ","
             << format_number(map_y(ys[point]), "%.1f");
      ++in_run;
    }
    flush();
    if (one.markers)
      for (size_t point = 0; point < xs.size() && point < ys.size(); ++point) {
        if (!std::isfinite(xs[point]) || !std::isfinite(ys[point])) continue;
        out << "<circle cx=\"" << format_number(map_x(xs[point]), "%.1f") << "\" cy=\""
            << format_number(map_y(ys[point]), "%.1f") << "\" r=\"3\" fill=\"" << color << "\"><title>"
            << xml_escape(one.name + " at " + tick_text(xs[point], 1.0) + ": " + format_number(ys[point], "%.4g"))
            << "</title></circle>\n";
      }
  }
  out << "</g>\n";

  // Points beyond the y range: a triangle on the edge they left by, with the true value on hover.
  OffScale off_scale;
  for (size_t index = 0; index < series.size(); ++index) {
    const std::string color = series[index].color.empty() ? palette_color(index) : series[index].color;
    off_scale_markers(out, series[index].name, color, drawn_x[index], drawn_y[index], y_low, y_high, map_x, top,
                      top + plot_height, off_scale);
  }
  if (off_scale.points > 0) {
    const bool above = off_scale.farthest > y_high;
    out << text_element(6, height - 8,
                        std::string(above ? "\xE2\x96\xB2 " : "\xE2\x96\xBC ") + std::to_string(off_scale.points) +
                            (off_scale.points == 1 ? " point" : " points") + " off the scale (" +
                            (above ? "max " : "min ") + format_number(off_scale.farthest, "%.4g") + ")",
                        "start", 11, "fill=\"#a33\"")
        << "\n";
  }

  // Legend, one row above the plot, right-aligned.
  double legend_width = 0;
  for (const PlotSeries& one : series) legend_width += 28 + kCharWidth * double(one.name.size()) + 14;
  double legend_x = std::max(left, left + plot_width - legend_width);
  const double legend_y = top - 10;
  for (size_t index = 0; index < series.size(); ++index) {
    const PlotSeries& one = series[index];
    const std::string color = one.color.empty() ? palette_color(index) : one.color;
    out << "<line x1=\"" << format_number(legend_x, "%.1f") << "\" y1=\"" << legend_y << "\" x2=\""
        << format_number(legend_x + 22, "%.1f") << "\" y2=\"" << legend_y << "\" stroke=\"" << color
        << "\" stroke-width=\"2.5\"" << (one.dashed ? " stroke-dasharray=\"5 3\"" : "") << "/>\n";
    out << text_element(legend_x + 27, legend_y + 4, one.name, "start", 11, "fill=\"#333\"") << "\n";
    legend_x += 28 + kCharWidth * double(one.name.size()) + 14;
  }
  out << "</svg>\n";
  return out.str();
}

// ---- Heatmap ---------------------------------------------------------------------------------

std::string svg_heatmap(const std::vector<std::vector<double>>& values, const HeatmapOptions& options) {
  const size_t rows = values.size(), columns = rows ? values[0].size() : 0;
  size_t longest_row_label = 0;
  for (const std::string& label : options.row_labels) longest_row_label = std::max(longest_row_label, label.size());
  const double left = std::max(44.0, 16 + kCharWidth * double(longest_row_label)) + (options.y_label.empty() ? 0 : 18);
  const double top = options.title.empty() ? 12 : 34;
  const double bar_space = 104;  // colour bar, its tick labels and its title
  const double cell_width =
      columns ? std::clamp(std::floor(double(options.max_width) / double(columns)), 1.0, 56.0) : 1;
  const double cell_height = options.cell_height > 0
                                 ? options.cell_height
                                 : std::clamp(std::floor(340.0 / double(std::max<size_t>(1, rows))), 6.0, 26.0);
  const double plot_width = cell_width * double(columns), plot_height = cell_height * double(rows);
  const double bottom = 34 + (options.x_label.empty() ? 0 : 16);
  const double width = left + plot_width + bar_space, height = top + std::max(plot_height, 120.0) + bottom;

  // Colour mapping.
  double low = options.low, high = options.high;
  const bool is_signed = options.scale == HeatmapScale::diverging_signed;
  if ((options.scale == HeatmapScale::sequential && !(high > low)) || (is_signed && !(high > 0.0))) {
    low = std::numeric_limits<double>::infinity();
    high = -low;
    for (const auto& row : values)
      for (double value : row)
        if (std::isfinite(value)) {
          low = std::min(low, value);
          high = std::max(high, value);
        }
    if (!std::isfinite(low)) low = 0.0, high = 1.0;
    if (is_signed) high = std::max(std::fabs(low), std::fabs(high)), low = 0.0;  // then -high .. high
    if (high <= low) high = low + 1.0;
  }
  if (is_signed) low = -high;
  const double log_limit = std::log(std::max(1.0001, options.ratio_limit));
  auto color_of = [&](double value) -> std::string {
    if (!std::isfinite(value)) return "#d9d9d9";
    if (options.scale == HeatmapScale::sequential) return sequential_color((value - low) / (high - low));
    if (is_signed) return diverging_color(std::clamp(value / high, -1.0, 1.0));
    if (value <= 0.0) return diverging_color(-1.0);
    return diverging_color(std::log(value) / log_limit);
  };

  std::ostringstream out;
  out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << format_number(width, "%.0f") << "\" height=\""
      << format_number(height, "%.0f") << "\" viewBox=\"0 0 " << format_number(width, "%.0f") << " "
      << format_number(height, "%.0f")
      << "\">\n<rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n";
  if (!options.title.empty())
    out << text_element(left, 20, options.title, "start", 14, "font-weight=\"bold\" fill=\"#222\"") << "\n";
  if (rows == 0 || columns == 0) {
    out << text_element(width / 2, height / 2, "no data", "middle", 13, "fill=\"#888\"") << "\n</svg>\n";
    return out.str();
  }
  out << "<g shape-rendering=\"crispEdges\">\n";
  for (size_t row = 0; row < rows; ++row)
    for (size_t column = 0; column < columns && column < values[row].size(); ++column) {
      const double value = values[row][column];
      std::string title;
      if (row < options.cell_titles.size() && column < options.cell_titles[row].size() &&
          !options.cell_titles[row][column].empty())
        title = options.cell_titles[row][column];
      else
        title = (row < options.row_labels.size() ? options.row_labels[row] : std::to_string(row)) + ", " +
                (column < options.column_labels.size() ? options.column_labels[column] : std::to_string(column)) +
                ": " + (std::isfinite(value) ? format_number(value, options.value_format.c_str()) : "no data");
      out << "<rect x=\"" << format_number(left + cell_width * double(column), "%.1f") << "\" y=\""
          << format_number(top + cell_height * double(row), "%.1f") << "\" width=\""
          << format_number(cell_width, "%.1f") << "\" height=\"" << format_number(cell_height, "%.1f") << "\" fill=\""
          << color_of(value) << "\"><title>" << xml_escape(title) << "</title></rect>\n";
    }
  out << "</g>\n";
  out << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << format_number(plot_width, "%.1f")
      << "\" height=\"" << format_number(plot_height, "%.1f") << "\" fill=\"none\" stroke=\"#888\"/>\n";
  if (options.annotate && cell_height >= 13)
    for (size_t row = 0; row < rows; ++row)
      for (size_t column = 0; column < columns && column < values[row].size(); ++column) {
        const double value = values[row][column];
        if (!std::isfinite(value)) continue;
        const std::string text = format_number(value, options.value_format.c_str());
        if (kCharWidth * 0.9 * double(text.size()) + 4 > cell_width) continue;
        const bool dark = luminance(parse_rgb(color_of(value))) < 140;
        out << text_element(left + cell_width * (double(column) + 0.5), top + cell_height * (double(row) + 0.5) + 3.5,
                            text, "middle", 10, dark ? "fill=\"#ffffff\"" : "fill=\"#111111\"")
            << "\n";
      }

  // Row labels, thinned so they never overlap (at least 11 px apart).
  const size_t row_every = size_t(std::max(1.0, std::ceil(11.0 / cell_height)));
  for (size_t row = 0; row < rows && row < options.row_labels.size(); row += row_every)
    out << text_element(left - 5, top + cell_height * (double(row) + 0.5) + 4, options.row_labels[row], "end", 10,
                        "fill=\"#333\"")
        << "\n";
  // Column labels, thinned to the widest label.
  size_t longest_column_label = 1;
  for (const std::string& label : options.column_labels)
    longest_column_label = std::max(longest_column_label, label.size());
  const size_t column_every =
      size_t(std::max(1.0, std::ceil((kCharWidth * 0.85 * double(longest_column_label) + 5) / cell_width)));
  for (size_t column = 0; column < columns && column < options.column_labels.size(); column += column_every)
    out << text_element(left + cell_width * (double(column) + 0.5), top + plot_height + 14,
                        options.column_labels[column], "middle", 10, "fill=\"#333\"")
        << "\n";
  if (!options.x_label.empty())
    out << text_element(left + plot_width / 2, top + plot_height + 32, options.x_label, "middle", 12, "fill=\"#333\"")
        << "\n";
  if (!options.y_label.empty()) {
    const double center = top + plot_height / 2;
    out << text_element(12, center, options.y_label, "middle", 12,
                        "transform=\"rotate(-90 12 " + format_number(center, "%.1f") + ")\" fill=\"#333\"")
        << "\n";
  }

  // Colour bar: 40 bands from the bottom (low) to the top (high), with 5 labelled ticks.
  const double bar_x = left + plot_width + 18, bar_height = std::max(plot_height, 120.0), bar_width = 14;
  const int bands = 40;
  out << "<g shape-rendering=\"crispEdges\">\n";
  for (int band = 0; band < bands; ++band) {
    const double fraction = (double(band) + 0.5) / bands;
    const std::string color =
        options.scale == HeatmapScale::sequential ? sequential_color(fraction) : diverging_color(2.0 * fraction - 1.0);
    out << "<rect x=\"" << format_number(bar_x, "%.1f") << "\" y=\""
        << format_number(top + bar_height * (1.0 - double(band + 1) / bands), "%.1f") << "\" width=\"" << bar_width
        << "\" height=\"" << format_number(bar_height / bands + 0.5, "%.1f") << "\" fill=\"" << color << "\"/>\n";
  }
  out << "</g>\n<rect x=\"" << format_number(bar_x, "%.1f") << "\" y=\"" << top << "\" width=\"" << bar_width
      << "\" height=\"" << format_number(bar_height, "%.1f") << "\" fill=\"none\" stroke=\"#888\"/>\n";
  for (int tick = 0; tick <= 4; ++tick) {
    const double fraction = double(tick) / 4.0;
    double value;
    std::string text;
    if (options.scale != HeatmapScale::diverging_ratio) {
      value = low + (high - low) * fraction;
      text = format_number(value, options.value_format.c_str());
    } else {
      value = std::exp((2.0 * fraction - 1.0) * log_limit);
      text = (tick == 0 ? "\xE2\x89\xA4" : tick == 4 ? "\xE2\x89\xA5" : "") + format_number(value, "%.2g") + "x";
    }
    const double y = top + bar_height * (1.0 - fraction);
    out << "<line x1=\"" << format_number(bar_x + bar_width, "%.1f") << "\" y1=\"" << format_number(y, "%.1f")
        << "\" x2=\"" << format_number(bar_x + bar_width + 4, "%.1f") << "\" y2=\"" << format_number(y, "%.1f")
        << "\" stroke=\"#666\"/>\n";
    out << text_element(bar_x + bar_width + 6, y + 4, text, "start", 10, "fill=\"#333\"") << "\n";
  }
  if (!options.colorbar_label.empty()) {
    const double center_y = top + bar_height / 2, label_x = bar_x + bar_width + 62;
    out << text_element(label_x, center_y, options.colorbar_label, "middle", 11,
                        "transform=\"rotate(90 " + format_number(label_x, "%.1f") + " " +
                            format_number(center_y, "%.1f") + ")\" fill=\"#333\"")
        << "\n";
  }
  out << "</svg>\n";
  return out.str();
}

}  // namespace switchyard
